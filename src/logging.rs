//! Feature logging, off the hot path: the served rows (exact feature vector, scores, model
//! version, position) and the ingested events go through a bounded queue to a writer thread that
//! appends JSON lines under `<data_dir>/logs/`. Training joins the two (see `training/`).
//! Feature rows are arrays; each served row names the schema (`feature_schema.<id>.json`, the
//! id a hash of the ordered feature names) it was written with, so a reordered `[[features]]`
//! after a restart cannot relabel older rows: the dataset builder refuses rows of mixed or
//! unknown schemas.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ServedRow {
    pub request_id: String,
    pub user_id: String,
    pub item_id: String,
    pub position: u32,
    pub served_at_ms: i64,
    pub surface: String,
    pub stage1_version: String,
    pub stage2_version: String,
    pub score: f32,
    pub stage1_score: f32,
    pub scored_by: String,
    pub sources: u8,
    pub features: Vec<f32>,
}

#[derive(Debug, Serialize)]
pub struct EventRow {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub action: &'static str,
    pub event_time_ms: i64,
    pub request_id: String,
}

pub enum LogLine {
    Served(ServedRow),
    Event(EventRow),
}

#[derive(Clone)]
pub struct FeatureLogger {
    tx: SyncSender<LogLine>,
}

impl FeatureLogger {
    /// Starts the writer thread; writes this feature schema under its id (once per schema).
    pub fn start(dir: &Path, feature_names: &[String]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (schema, text) = schema_of(feature_names)?;
        let file = dir.join(format!("feature_schema.{schema}.json"));
        if !file.is_file() {
            std::fs::write(&file, text)?;
        }
        // The unversioned file of earlier builds would label every generation with today's order.
        let _ = std::fs::remove_file(dir.join("feature_schema.json"));
        let (tx, rx) = sync_channel::<LogLine>(8192);
        let mut served = RotatingFile::open(dir.join("served.jsonl"))?;
        let mut events = RotatingFile::open(dir.join("events.jsonl"))?;
        std::thread::Builder::new().name("feature-log".into()).spawn(move || {
            // Block for one line, then drain what is queued before flushing.
            while let Ok(first) = rx.recv() {
                let mut next = Some(first);
                while let Some(line) = next {
                    let r = match line {
                        LogLine::Served(r) => served.write_row(&Stamped { schema: &schema, row: &r }),
                        LogLine::Event(r) => events.write_row(&r),
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "feature log write failed");
                    }
                    next = rx.try_recv().ok();
                }
                let _ = served.flush();
                let _ = events.flush();
            }
        })?;
        Ok(Self { tx })
    }

    /// Never blocks the request: when the queue is full the line is dropped and counted.
    pub fn log(&self, line: LogLine) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("recsys_feature_log_dropped_total").increment(1);
            }
        }
    }
}

/// Schema id (16 hex digits of SHA-256 over the ordered names) and the schema file's text.
pub fn schema_of(feature_names: &[String]) -> std::io::Result<(String, Vec<u8>)> {
    use sha2::Digest;
    let text = serde_json::to_vec_pretty(feature_names)?;
    let id = sha2::Sha256::digest(&text)[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok((id, text))
}

/// A served row as logged: its schema id first.
#[derive(Serialize)]
struct Stamped<'a> {
    schema: &'a str,
    #[serde(flatten)]
    row: &'a ServedRow,
}

/// A JSON-lines file that rotates at `ROTATE_BYTES` and keeps `KEEP` old generations
/// (`served.1.jsonl` is the newest old one), so disk use stays bounded on a long-running node.
struct RotatingFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    written: u64,
}

const ROTATE_BYTES: u64 = 256 * 1024 * 1024;
const KEEP: usize = 4;

impl RotatingFile {
    fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self { path, out: std::io::BufWriter::new(file), written })
    }

    fn generation(&self, n: usize) -> PathBuf {
        let stem = self.path.file_stem().and_then(|s| s.to_str()).unwrap_or("log");
        self.path.with_file_name(format!("{stem}.{n}.jsonl"))
    }

    fn write_row<T: Serialize>(&mut self, row: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        if self.written + line.len() as u64 > ROTATE_BYTES {
            self.out.flush()?;
            for n in (1..KEEP).rev() {
                let _ = std::fs::rename(self.generation(n), self.generation(n + 1));
            }
            std::fs::rename(&self.path, self.generation(1))?;
            *self = Self::open(self.path.clone())?;
        }
        self.out.write_all(&line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_id_changes_with_order() {
        let a = super::schema_of(&["x".into(), "y".into()]).unwrap().0;
        let b = super::schema_of(&["y".into(), "x".into()]).unwrap().0;
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
