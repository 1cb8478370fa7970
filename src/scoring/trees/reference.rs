//! Served rows with LightGBM's own p(click), written by `training/train.py` beside the model
//! (`stage1_reference.bin`): what the native engine and ONNX Runtime are checked against.
//! Little-endian: `RSREF1\0\0`, u32 rows, u32 cols, rows × cols f32, rows f64, rows u32 request.
use std::path::Path;

use super::TreeError;

pub struct ServedReference {
    pub cols: usize,
    /// Row-major features, in the manifest's stage-1 input order.
    pub rows: Vec<f32>,
    /// LightGBM's p(click) per row.
    pub lightgbm: Vec<f64>,
    /// Ordinal of the request each row was served in (rows of one request are consecutive).
    pub request: Vec<u32>,
}

impl ServedReference {
    pub fn load(path: &Path) -> Result<Self, TreeError> {
        let b = std::fs::read(path).map_err(|e| TreeError::Io(format!("{}: {e}", path.display())))?;
        let bad = |m: &str| TreeError::Format(format!("{}: {m}", path.display()));
        if b.len() < 16 || &b[..8] != b"RSREF1\0\0" {
            return Err(bad("not a served-rows reference file"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
        let (n, cols) = (u32_at(8), u32_at(12));
        let need = n
            .checked_mul(cols)
            .and_then(|v| v.checked_mul(4))
            .and_then(|v| v.checked_add(16 + n * 12))
            .ok_or_else(|| bad("row count overflows"))?;
        if b.len() != need {
            return Err(bad(&format!("{} bytes, expected {need} for {n} rows of {cols}", b.len())));
        }
        let mut o = 16;
        let rows = b[o..o + n * cols * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        o += n * cols * 4;
        let lightgbm = b[o..o + n * 8].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        o += n * 8;
        let request = b[o..].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Self { cols, rows, lightgbm, request })
    }

    pub fn len(&self) -> usize {
        self.lightgbm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lightgbm.is_empty()
    }

    /// Row ranges of each request, in file order.
    pub fn requests(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = vec![];
        let mut start = 0;
        for i in 1..=self.request.len() {
            if i == self.request.len() || self.request[i] != self.request[start] {
                out.push(start..i);
                start = i;
            }
        }
        out
    }
}
