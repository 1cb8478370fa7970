//! Model loading stays inside the configured models root: ReloadModels may name only a directory
//! under it, and a manifest's model files only files inside its own directory, judged after
//! symlinks are resolved. Errors say what the operator must fix without quoting file contents or
//! telling whether a path outside the root exists.
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PathError {
    #[error("must name a directory under the node's models root (scoring.models_root)")]
    OutsideRoot,
    #[error("is not a directory under the models root")]
    NotFound,
    #[error("the node's models root is not an accessible directory")]
    NoRoot,
    #[error("model file `{0}` must be a plain relative path inside the model directory")]
    BadFileName(String),
    #[error("model file `{0}` is missing")]
    FileMissing(String),
}

/// `..` and `.` removed without touching the file system.
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The resolved directory `requested` names (relative: to the root), if it lies under `root`.
pub fn confine_dir(root: &Path, requested: &Path) -> Result<PathBuf, PathError> {
    let root = root.canonicalize().map_err(|_| PathError::NoRoot)?;
    let joined = lexical(&root.join(requested));
    // Outside the root by its spelling: one answer, whether or not the path exists.
    if !joined.starts_with(&root) {
        return Err(PathError::OutsideRoot);
    }
    let real = joined.canonicalize().map_err(|_| PathError::NotFound)?;
    if !real.starts_with(&root) {
        return Err(PathError::OutsideRoot); // a symlink leading out
    }
    if !real.is_dir() {
        return Err(PathError::NotFound);
    }
    Ok(real)
}

/// The resolved path of the model file `name` of a manifest in `dir`, if it stays inside `dir`.
pub fn confine_file(dir: &Path, name: &str) -> Result<PathBuf, PathError> {
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(PathError::BadFileName(name.to_string()));
    }
    let dir = dir.canonicalize().map_err(|_| PathError::NoRoot)?;
    let real = dir.join(rel).canonicalize().map_err(|_| PathError::FileMissing(name.to_string()))?;
    if !real.starts_with(&dir) {
        return Err(PathError::BadFileName(name.to_string()));
    }
    if !real.is_file() {
        return Err(PathError::FileMissing(name.to_string()));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_root_resolve() {
        let base = std::env::temp_dir().join(format!("recsys-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("v2")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(root.join("v2/m.onnx"), b"x").unwrap();
        std::fs::write(base.join("outside/secret"), b"x").unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(base.join("outside/secret"), root.join("v2/leak.onnx")).unwrap();
        let real_root = root.canonicalize().unwrap();
        assert_eq!(confine_dir(&root, Path::new("v2")), Ok(real_root.join("v2")));
        assert_eq!(confine_dir(&root, &root.join("v2")), Ok(real_root.join("v2")));
        assert_eq!(confine_dir(&root, Path::new("")), Ok(real_root.clone()));
        for p in ["../outside", "/etc", "v2/../../outside", "escape", "/no/such/dir"] {
            assert_eq!(confine_dir(&root, Path::new(p)), Err(PathError::OutsideRoot), "{p}");
        }
        assert_eq!(confine_dir(&root, Path::new("missing")), Err(PathError::NotFound));
        assert_eq!(confine_dir(&root, Path::new("v2/m.onnx")), Err(PathError::NotFound));
        let dir = root.join("v2");
        assert!(confine_file(&dir, "m.onnx").is_ok());
        for f in ["../v2/m.onnx", "/etc/passwd", "leak.onnx", "", "./m.onnx"] {
            assert!(matches!(confine_file(&dir, f), Err(PathError::BadFileName(_))), "{f}");
        }
        assert_eq!(confine_file(&dir, "nope.onnx"), Err(PathError::FileMissing("nope.onnx".into())));
        let _ = std::fs::remove_dir_all(&base);
    }
}
