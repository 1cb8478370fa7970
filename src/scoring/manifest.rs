//! The model manifest: which ONNX files make a deployed version, their ordered input features and
//! output heads. A manifest naming a feature the node does not declare is refused.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::trees::TreeEnsemble;
use super::ScoringError;
use crate::config::Stage1Engine;
use crate::domain::quote;
use crate::features::FeaturePlan;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub file: String,
    pub inputs: Vec<String>,
    pub output: String,
    /// Values per row in `output`.
    pub output_width: usize,
    /// Column to use as the score (stage 1); None keeps all columns (stage 2 heads).
    #[serde(default)]
    pub output_column: Option<usize>,
    #[serde(default)]
    pub heads: Vec<String>,
    /// Features to order a batch by before it is scored (stage 1): rows sorted by the feature most
    /// trees split on first take the same branches one after another, which ONNX Runtime's tree
    /// traversal runs ~30 % faster (branch prediction). Scores are the same in any order.
    #[serde(default)]
    pub batch_order: Vec<String>,
    /// Stage 1: the LightGBM text model training wrote beside the ONNX export, the reference the
    /// native engine is checked against (the node reads the ONNX file).
    #[serde(default)]
    pub lightgbm: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub version: String,
    pub stage1: ModelSpec,
    pub stage2: ModelSpec,
    #[serde(default)]
    pub trained_on: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub dir: PathBuf,
    pub version: String,
    pub stage1: ModelSpec,
    pub stage2: ModelSpec,
    /// Columns of the declared feature row each model reads, in its input order.
    pub stage1_columns: Vec<usize>,
    pub stage2_columns: Vec<usize>,
    /// Declared-feature columns of `stage1.batch_order`.
    pub stage1_order: Vec<usize>,
    /// Stage-2 head names, shared by every reply instead of copied per item.
    pub head_names: std::sync::Arc<[String]>,
    /// The stage-1 ensemble for the native engine (`scoring.stage1_engine = "native"`); None:
    /// stage 1 runs in ONNX Runtime.
    pub stage1_native: Option<std::sync::Arc<TreeEnsemble>>,
}

/// A read failure without the OS detail (which can say what else exists there).
fn io_message(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "missing".into(),
        std::io::ErrorKind::InvalidData => "not UTF-8 text".into(),
        _ => "cannot be read".into(),
    }
}

/// Where the JSON is wrong; syntax errors never quote the file's text, and a type or value error
/// quotes at most a short prefix of serde's message (which embeds the offending value: a 100 KB
/// string would otherwise come back whole in the reply and the log).
fn json_message(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => {
            let full = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            let what = full.strip_suffix(&at).unwrap_or(&full);
            format!("wrong type or value (line {}, column {}): {}", e.line(), e.column(), quote(what))
        }
        _ => format!("not valid JSON (line {}, column {})", e.line(), e.column()),
    }
}

/// Longest model version accepted: it is copied into every reply and log line.
pub const MAX_VERSION_CHARS: usize = 64;

/// A model version is a short printable name: 1..=64 printable ASCII characters, no spaces.
fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VERSION_CHARS || !v.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "version: must be 1..={MAX_VERSION_CHARS} printable ASCII characters without spaces (got `{}`)",
            quote(v)
        ));
    }
    Ok(())
}

/// A model file name: short, printable (paths are checked again, against the directory, below).
fn check_file(field: &str, f: &str) -> Result<(), String> {
    if f.is_empty() || f.len() > 255 || f.chars().any(char::is_control) {
        return Err(format!("{field}: must be 1..=255 bytes without control characters (got `{}`)", quote(f)));
    }
    Ok(())
}

impl Manifest {
    pub fn load(dir: &Path, plan: &FeaturePlan) -> Result<Self, ScoringError> {
        let path = dir.join("manifest.json");
        let bad = |message: String| ScoringError::Manifest { path: path.clone(), message };
        // The manifest itself may not be a link out of the root either.
        super::paths::confine_file(dir, "manifest.json").map_err(|e| bad(e.to_string()))?;
        let text = std::fs::read_to_string(&path).map_err(|e| bad(io_message(&e)))?;
        let m: ManifestFile = serde_json::from_str(&text).map_err(|e| bad(json_message(&e)))?;
        check_version(&m.version).map_err(bad)?;
        check_file("stage1.file", &m.stage1.file).map_err(bad)?;
        check_file("stage2.file", &m.stage2.file).map_err(bad)?;
        let stage1_columns = plan.columns_for(&m.stage1.inputs).map_err(|e| bad(format!("stage1: {e}")))?;
        let stage2_columns = plan.columns_for(&m.stage2.inputs).map_err(|e| bad(format!("stage2: {e}")))?;
        let stage1_order =
            plan.columns_for(&m.stage1.batch_order).map_err(|e| bad(format!("stage1.batch_order: {e}")))?;
        if m.stage2.heads.len() != m.stage2.output_width {
            return Err(bad(format!(
                "stage2 declares {} heads but output_width {}",
                m.stage2.heads.len(),
                m.stage2.output_width
            )));
        }
        if m.stage1.output_column.is_none_or(|c| c >= m.stage1.output_width) {
            return Err(bad("stage1.output_column must name a column of the output".into()));
        }
        for f in [&m.stage1.file, &m.stage2.file] {
            super::paths::confine_file(dir, f).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            version: m.version,
            head_names: m.stage2.heads.clone().into(),
            stage1: m.stage1,
            stage2: m.stage2,
            stage1_columns,
            stage2_columns,
            stage1_order,
            stage1_native: None,
        })
    }

    /// Prepares stage 1 for `engine`: for `native`, reads the ensemble out of the stage-1 ONNX
    /// file; a model the native engine cannot evaluate exactly is refused with the reason.
    pub fn with_engine(mut self, engine: Stage1Engine) -> Result<Self, ScoringError> {
        self.stage1_native = match engine {
            Stage1Engine::Ort => None,
            Stage1Engine::Native => {
                let path = self.dir.join(&self.stage1.file);
                let e = TreeEnsemble::from_onnx_file(&path, self.stage1_columns.len()).map_err(|e| {
                    ScoringError::Model { path: path.clone(), message: format!("native stage-1 engine: {e}") }
                })?;
                Some(std::sync::Arc::new(e))
            }
        };
        Ok(self)
    }

    /// The stage-1 engine in use, for metrics and status.
    pub fn stage1_engine(&self) -> &'static str {
        if self.stage1_native.is_some() {
            "native"
        } else {
            "ort"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_short_printable_names() {
        assert!(check_version("v2-2026.12.07+gbdt").is_ok());
        for bad in ["", "with space", "esc\u{1b}[31m", "tab\t"] {
            let e = check_version(bad).unwrap_err();
            assert!(e.starts_with("version: "), "{e}");
            assert!(!e.contains('\u{1b}'), "{e}");
        }
        let e = check_version(&"v".repeat(100 * 1024)).unwrap_err();
        assert!(e.len() < 200 && e.contains("(102400 bytes)"), "{e}");
    }

    #[test]
    fn type_errors_quote_a_short_prefix() {
        let big = "x".repeat(100 * 1024);
        let text = format!("{{\"version\": \"v1\", \"stage1\": {{\"file\": \"a\", \"inputs\": [], \"output\": \"o\", \"output_width\": \"{big}\"}}}}");
        let e = serde_json::from_str::<ManifestFile>(&text).unwrap_err();
        let m = json_message(&e);
        assert!(m.starts_with("wrong type or value (line 1, column"), "{m}");
        assert!(m.len() < 200, "{} bytes: {}", m.len(), &m[..200]);
    }
}
