//! What the CLI shows people: errors as one readable line (no Rust Debug text, gRPC codes as the
//! gRPC spec names them), logs set up once for every subcommand (colour only on a terminal, one
//! line per event, JSON lines for log shippers).
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

pub use crate::metrics::code_name;

/// Writes a command's results to stdout. When the reader has gone away (`recsys status | head -3`)
/// the command stops there, quietly and with exit code 0, as other command-line tools do; any other
/// write error is one line on stderr and exit code 1. SIGPIPE stays ignored (Rust's default): set
/// back to the default it would also kill the process, silently and with code 141, when a *socket*
/// closes under a write (a client pointed at the metrics port, say), where a transport error with
/// its message is the right answer. Use through [`outln!`](crate::outln) and [`out!`](crate::out).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for a command's results: stops quietly when stdout's reader has gone away.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's results: stops quietly when stdout's reader has gone away.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!($($arg)*))
    };
}

/// A gRPC error as people read it: `INVALID_ARGUMENT: k: must be at least 1`.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    // A plaintext client at a port serving TLS: the server drops the connection during the
    // HTTP/2 handshake, seen as one of these depending on timing.
    let tls_hint = if crate::transport::tls::outbound().is_none() {
        "; if the node serves TLS, pass --tls-ca or set RECSYS_TLS_CA"
    } else {
        ""
    };
    if s.code() == tonic::Code::Unknown && s.message() == "transport error" {
        // What a client sees when the server closes the connection under it, e.g. at the metrics
        // port, which speaks HTTP/1.
        return anyhow::anyhow!(
            "UNKNOWN: transport error: the server closed the connection (is that a node's gRPC address? \
             the metrics port speaks plain HTTP{tls_hint})"
        );
    }
    let dropped = (s.code() == tonic::Code::Cancelled && s.message() == "operation was canceled")
        || s.message().starts_with("h2 protocol error");
    if dropped && !tls_hint.is_empty() {
        return anyhow::anyhow!(
            "{}: {}: the server dropped the connection ({})",
            code_name(s.code()),
            s.message(),
            tls_hint.trim_start_matches("; ")
        );
    }
    anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())
}

/// An error and its causes on one line, each cause once (transport errors repeat their source's
/// text), without the backtrace anyhow's Debug form would add when RUST_BACKTRACE is set.
pub fn error_line(e: &anyhow::Error) -> String {
    let refused = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || c.to_string().contains("Connection refused")
    });
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        if refused && text.starts_with("connecting to ") {
            // The causes below only restate "connection refused" in transport terms.
            line.push_str(": connection refused (is a node running there?)");
            break;
        }
    }
    line
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line (ts, level, target, message, fields, spans).
    Json,
}

/// Logs go to stderr (stdout is the command's output). `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => b.with_ansi(false).event_format(JsonLines).try_init(),
    };
    // Already set (a test that initialised it first): keep that one.
    let _ = r;
}

/// `--log-format json`: one object per event, fields flattened, spans as a list.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), ts.into());
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        if let Some(m) = fields.0.remove("message") {
            obj.insert("message".into(), m);
        }
        for (k, v) in fields.0 {
            obj.entry(k).or_insert(v);
        }
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<serde_json::Value> = scope
                .from_root()
                .map(|span| {
                    let ext = span.extensions();
                    let f = ext.get::<FormattedFields<N>>().map(|f| f.fields.to_string()).unwrap_or_default();
                    serde_json::json!({"name": span.name(), "fields": f})
                })
                .collect();
            if !spans.is_empty() {
                obj.insert("spans".into(), spans.into());
            }
        }
        writeln!(w, "{}", serde_json::Value::Object(obj))
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.0.insert(f.name().into(), v.to_string().into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_name_codes_as_grpc_does() {
        let e = status_error(tonic::Status::invalid_argument("k: must be at least 1"));
        assert_eq!(error_line(&e), "INVALID_ARGUMENT: k: must be at least 1");
    }

    #[test]
    fn causes_are_shown_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let e = anyhow::Error::new(io).context("tcp connect error: Connection refused (os error 111)");
        let e = e.context("connecting to http://127.0.0.1:1");
        let line = error_line(&e);
        assert_eq!(line, "connecting to http://127.0.0.1:1: connection refused (is a node running there?)");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&e), "outer: inner");
    }
}
