//! The native stage-1 engine: a tree-ensemble evaluator that scores a whole batch of rows with the
//! deployed ONNX `TreeEnsembleRegressor` (+ `Sigmoid`) and gives ONNX Runtime's answers.
//!
//! Algorithm: QuickScorer's bit vectors (Lucchese et al., SIGIR 2015), evaluated tree by tree
//! over blocks of rows. Each tree's leaves are numbered left to right and a row keeps one bit per
//! leaf (≤ 64 leaves: a low and a high 32-bit word); every branch node whose test is false for a
//! row clears the bits of its left subtree's leaves, and the row's exit leaf is then the leftmost
//! bit still set. For one tree and a block of rows the words live in vector registers (AVX2: 64
//! rows = 8 vectors per word; SSE2: 16 rows = 4), and each node is one broadcast threshold, one
//! compare per vector and one masked and-not — no pointer chasing, no data-dependent branch, no
//! store until the tree is done. Measured on this model (100 trees × 63 leaves, 1000 served rows):
//! the feature-major QuickScorer order, which skips nodes above a block's largest value but keeps
//! the bit vectors in memory, ran 0.7–0.9 ms with AVX2; tree-major with words in registers
//! 0.35–0.47 ms; ONNX Runtime 2.7–3.1 ms (`cargo bench --bench trees`). The variant is chosen at
//! run time (`Kernel::detect`), never by the build machine's flags.
//!
//! Semantics follow the model exactly: BRANCH_LEQ/LT/GTE/GT, missing-value tracks (a row with a
//! NaN in any input is scored by a plain traversal of the original nodes), base value, SUM,
//! logistic. Sums are in f64 like LightGBM's (on 20k served rows: within 4.3e-8 of LightGBM, 2.5e-7
//! of ORT, which sums in f32).
mod onnx;
pub mod reference;

use std::path::Path;

pub use onnx::Mode;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{0}")]
    Format(String),
    #[error("not supported by the native engine: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(String),
}

/// Which variant of the block kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The target's baseline instruction set: SSE2 on x86-64 (every x86-64 CPU has it), plain
    /// Rust elsewhere; `PORTABLE_ROWS` rows per block.
    Portable,
    /// AVX2, `AVX2_ROWS` rows per block; chosen only when the CPU reports it.
    Avx2,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
        }
    }

    /// The best variant this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("bmi1") {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }
}

/// A branch node of the original model, for the reference traversal.
#[derive(Debug, Clone, Copy)]
enum Node {
    Branch { feature: u32, threshold: f32, mode: Mode, missing_true: bool, yes: u32, no: u32 },
    Leaf { value: f32 },
}

/// One branch node as QuickScorer uses it: when `x > threshold` the row takes the right branch,
/// so the leaves of the left subtree (`clear` bits of the tree's low or high word) cannot be its
/// exit leaf. A node whose left subtree spans both words has one entry in each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    threshold: f32,
    feature: u32,
    clear: u32,
}

/// Rows per block of the AVX2 kernel (8 vectors per bit-vector word: 8 accumulators, the
/// threshold, the mask and a temporary fit AVX2's 16 registers).
const AVX2_ROWS: usize = 64;
/// Rows per block of the portable kernel (4 SSE2 vectors per word).
const PORTABLE_ROWS: usize = 16;

/// Leaves per tree the bit vectors hold.
pub const MAX_LEAVES: usize = 64;

#[derive(Debug)]
pub struct TreeEnsemble {
    inputs: usize,
    base: f64,
    /// Reference form: every tree's nodes, root first.
    trees: Vec<Vec<Node>>,
    /// Every tree's entries: `entries[lo_start..hi_start]` clear its low word,
    /// `entries[hi_start..end]` its high word (`tree_entries[t] = (lo_start, hi_start, end)`).
    entries: Vec<Entry>,
    tree_entries: Vec<(u32, u32, u32)>,
    /// Each tree's leaf values, left to right (unused slots 0).
    leaves: Vec<[f32; MAX_LEAVES]>,
    kernel: Kernel,
}

impl TreeEnsemble {
    /// Loads the ensemble of an ONNX file; `inputs` is the row width the manifest declares.
    pub fn from_onnx_file(path: &Path, inputs: usize) -> Result<Self, TreeError> {
        let bytes = std::fs::read(path).map_err(|e| TreeError::Io(format!("cannot read the model: {e}")))?;
        Self::from_onnx(&bytes, inputs)
    }

    pub fn from_onnx(bytes: &[u8], inputs: usize) -> Result<Self, TreeError> {
        if inputs == 0 {
            return Err(TreeError::Format("the manifest names no stage-1 inputs".into()));
        }
        let raw = onnx::read(bytes)?;
        if let Some(w) = raw.inputs {
            if w != inputs {
                return Err(TreeError::Format(format!("the model reads {w} inputs, the manifest names {inputs}")));
            }
        }
        Self::build(raw, inputs)
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Forces a kernel (benches and tests compare them); AVX2 only where the CPU has it.
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel =
            if kernel == Kernel::Avx2 && Kernel::detect() != Kernel::Avx2 { Kernel::Portable } else { kernel };
        self
    }

    pub fn trees(&self) -> usize {
        self.trees.len()
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    fn build(raw: onnx::RawEnsemble, inputs: usize) -> Result<Self, TreeError> {
        let n = raw.node_ids.len();
        let lens = [
            ("nodes_treeids", raw.tree_ids.len()),
            ("nodes_featureids", raw.features.len()),
            ("nodes_values", raw.thresholds.len()),
            ("nodes_modes", raw.modes.len()),
            ("nodes_truenodeids", raw.true_ids.len()),
            ("nodes_falsenodeids", raw.false_ids.len()),
        ];
        if let Some((name, len)) = lens.iter().find(|(_, l)| *l != n) {
            return Err(TreeError::Format(format!("{name} has {len} values for {n} nodes")));
        }
        if !raw.missing_true.is_empty() && raw.missing_true.len() != n {
            return Err(TreeError::Format("nodes_missing_value_tracks_true does not match the nodes".into()));
        }
        if raw.target_nodes.len() != raw.target_trees.len() || raw.target_weights.len() != raw.target_trees.len() {
            return Err(TreeError::Format("target_* attributes differ in length".into()));
        }
        // Nodes by (tree, node id); trees in ascending id order (ORT sums in that order too).
        let mut index = std::collections::BTreeMap::new();
        for i in 0..n {
            if index.insert((raw.tree_ids[i], raw.node_ids[i]), i).is_some() {
                return Err(TreeError::Format(format!("tree {} repeats node {}", raw.tree_ids[i], raw.node_ids[i])));
            }
        }
        // ORT takes each tree's first listed node as its root and one weight per leaf (its
        // single-target path keeps the first): anything it would read differently is refused.
        let mut first_listed = std::collections::HashMap::new();
        for i in 0..n {
            let t = raw.tree_ids[i];
            let starts_run = i == 0 || raw.tree_ids[i - 1] != t;
            if starts_run && first_listed.insert(t, raw.node_ids[i]).is_some() {
                return Err(TreeError::Unsupported(format!("tree {t}: its nodes are not listed together")));
            }
        }
        let mut leaf_value = std::collections::HashMap::new();
        for k in 0..raw.target_trees.len() {
            let key = (raw.target_trees[k], raw.target_nodes[k]);
            if !index.contains_key(&key) {
                return Err(TreeError::Format(format!("a target weight names missing node {key:?}")));
            }
            if leaf_value.insert(key, raw.target_weights[k]).is_some() {
                return Err(TreeError::Unsupported(format!("tree {} leaf {} has more than one weight", key.0, key.1)));
            }
        }
        let tree_ids: std::collections::BTreeSet<i64> = raw.tree_ids.iter().copied().collect();
        let mut trees = Vec::with_capacity(tree_ids.len());
        for &t in &tree_ids {
            let ids: Vec<i64> = index.range((t, i64::MIN)..=(t, i64::MAX)).map(|((_, id), _)| *id).collect();
            let children: std::collections::HashSet<i64> = ids
                .iter()
                .map(|id| index[&(t, *id)])
                .filter(|&i| raw.modes[i] != Mode::Leaf)
                .flat_map(|i| [raw.true_ids[i], raw.false_ids[i]])
                .collect();
            if ids.len() > 2 * MAX_LEAVES - 1 {
                return Err(TreeError::Unsupported(format!(
                    "tree {t} has {} nodes (at most {MAX_LEAVES} leaves per tree)",
                    ids.len()
                )));
            }
            let roots: Vec<i64> = ids.iter().copied().filter(|id| !children.contains(id)).collect();
            let [root] = roots.as_slice() else {
                return Err(TreeError::Format(format!("tree {t} has {} roots", roots.len())));
            };
            if first_listed.get(&t) != Some(root) {
                return Err(TreeError::Unsupported(format!("tree {t}: its root {root} is not its first listed node")));
            }
            // Depth-first copy, root first; a node reached twice (not a tree) is refused.
            let mut nodes: Vec<Node> = Vec::with_capacity(ids.len());
            let mut slot = std::collections::HashMap::new();
            let mut stack = vec![(*root, None::<(usize, bool)>)];
            while let Some((id, parent)) = stack.pop() {
                let &i = index
                    .get(&(t, id))
                    .ok_or_else(|| TreeError::Format(format!("tree {t} points at missing node {id}")))?;
                if slot.insert(id, nodes.len()).is_some() || nodes.len() > ids.len() {
                    return Err(TreeError::Format(format!("tree {t} reaches node {id} twice")));
                }
                let me = nodes.len() as u32;
                if let Some((p, yes)) = parent {
                    if let Node::Branch { yes: y, no: n, .. } = &mut nodes[p] {
                        *if yes { y } else { n } = me;
                    }
                }
                if raw.modes[i] == Mode::Leaf {
                    let value = leaf_value
                        .get(&(t, id))
                        .copied()
                        .ok_or_else(|| TreeError::Format(format!("tree {t} leaf {id} has no target weight")))?;
                    nodes.push(Node::Leaf { value });
                    continue;
                }
                let feature = usize::try_from(raw.features[i]).ok().filter(|f| *f < inputs).ok_or_else(|| {
                    TreeError::Format(format!("tree {t} node {id} reads input {} of {inputs}", raw.features[i]))
                })?;
                let threshold = raw.thresholds[i];
                if !threshold.is_finite() {
                    return Err(TreeError::Unsupported(format!("tree {t} node {id}: threshold {threshold}")));
                }
                let missing_true = raw.missing_true.get(i).copied().unwrap_or(false);
                nodes.push(Node::Branch {
                    feature: feature as u32,
                    threshold,
                    mode: raw.modes[i],
                    missing_true,
                    yes: 0,
                    no: 0,
                });
                let me = nodes.len() - 1;
                stack.push((raw.false_ids[i], Some((me, false))));
                stack.push((raw.true_ids[i], Some((me, true))));
            }
            trees.push(nodes);
        }
        if trees.is_empty() {
            return Err(TreeError::Format("the ensemble has no trees".into()));
        }
        let mut me = Self {
            inputs,
            base: raw.base as f64,
            trees,
            entries: vec![],
            tree_entries: vec![],
            leaves: vec![],
            kernel: Kernel::detect(),
        };
        me.lay_out()?;
        Ok(me)
    }

    /// Builds the QuickScorer tables from the trees: every branch normalised to "left when
    /// x ≤ t" (LT/GTE thresholds move to the next float below; GT/GTE swap their children).
    fn lay_out(&mut self) -> Result<(), TreeError> {
        for (t, nodes) in self.trees.iter().enumerate() {
            // In-order walk of the normalised tree: leaves get consecutive numbers; each branch
            // learns the range of its left subtree's leaves.
            let mut leaves: Vec<f32> = vec![];
            let mut ranges: Vec<(u32, f32, usize, usize)> = vec![]; // feature, threshold, first, end
            fn walk(nodes: &[Node], i: usize, leaves: &mut Vec<f32>, ranges: &mut Vec<(u32, f32, usize, usize)>) {
                match nodes[i] {
                    Node::Leaf { value } => leaves.push(value),
                    Node::Branch { feature, threshold, mode, yes, no, .. } => {
                        let (t, left, right) = match mode {
                            Mode::Leq => (threshold, yes, no),
                            Mode::Lt => (threshold.next_down(), yes, no),
                            Mode::Gt => (threshold, no, yes),
                            Mode::Gte => (threshold.next_down(), no, yes),
                            Mode::Leaf => unreachable!("leaves are Node::Leaf"),
                        };
                        let first = leaves.len();
                        walk(nodes, left as usize, leaves, ranges);
                        ranges.push((feature, t, first, leaves.len()));
                        walk(nodes, right as usize, leaves, ranges);
                    }
                }
            }
            walk(nodes, 0, &mut leaves, &mut ranges);
            if leaves.len() > MAX_LEAVES {
                return Err(TreeError::Unsupported(format!(
                    "tree {t} has {} leaves (at most {MAX_LEAVES})",
                    leaves.len()
                )));
            }
            // Two words per tree whatever its size: the exit leaf is then found without a branch
            // on which word holds it.
            let mut per_word: [Vec<Entry>; 2] = [vec![], vec![]];
            for (feature, threshold, first, end) in ranges {
                // One entry per word the left subtree's leaves touch.
                let words_touched = first / 32..=(end - 1) / 32;
                for (w, list) in per_word.iter_mut().enumerate().filter(|(w, _)| words_touched.contains(w)) {
                    let lo = first.max(w * 32) - w * 32;
                    let hi = end.min(w * 32 + 32) - w * 32;
                    let clear = (((1u64 << hi) - 1) & !((1u64 << lo) - 1)) as u32;
                    list.push(Entry { threshold, feature, clear });
                }
            }
            let mut starts = [0u32; 3];
            for (w, mut es) in per_word.into_iter().enumerate() {
                // By feature: consecutive entries read the same row values (cache lines).
                es.sort_by_key(|e| e.feature);
                starts[w] = self.entries.len() as u32;
                self.entries.extend(es);
            }
            starts[2] = self.entries.len() as u32;
            self.tree_entries.push((starts[0], starts[1], starts[2]));
            let mut values = [0f32; MAX_LEAVES];
            values[..leaves.len()].copy_from_slice(&leaves);
            self.leaves.push(values);
        }
        Ok(())
    }

    /// p(click) for each row of `data` (`rows × inputs`, row-major) into `out`.
    pub fn predict(&self, data: &[f32], out: &mut Vec<f32>) -> Result<(), TreeError> {
        if !data.len().is_multiple_of(self.inputs) {
            return Err(TreeError::Format(format!(
                "{} values is not a whole number of {}-wide rows",
                data.len(),
                self.inputs
            )));
        }
        let start = out.len();
        out.resize(start + data.len() / self.inputs, 0.0);
        let dst = &mut out[start..];
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only ever set when the CPU reports AVX2 and BMI1.
            Kernel::Avx2 => unsafe { self.predict_avx2(data, dst) },
            _ => self.predict_blocks::<PORTABLE_ROWS>(data, dst, kernels::portable),
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,bmi1")]
    unsafe fn predict_avx2(&self, data: &[f32], out: &mut [f32]) {
        // SAFETY: this function only runs on a CPU with AVX2 (see `predict`).
        self.predict_blocks::<AVX2_ROWS>(data, out, |lo, hi, x, l, s| unsafe { kernels::avx2(lo, hi, x, l, s) })
    }

    /// The kernel, inlined into each instruction-set variant so the compiler vectorises the
    /// per-block loops over `B` rows with that variant's registers.
    #[inline(always)]
    fn predict_blocks<const B: usize>(
        &self,
        data: &[f32],
        out: &mut [f32],
        apply: impl Fn(&[Entry], &[Entry], &[[f32; B]], &[f32; 64], &mut [f64; B]),
    ) {
        let cols = self.inputs;
        let mut xs = vec![[0f32; B]; cols];
        for (b, dst) in out.chunks_mut(B).enumerate() {
            let rows = dst.len();
            let block = &data[b * B * cols..(b * B + rows) * cols];
            let mut has_nan = false;
            for (r, row) in block.chunks_exact(cols).enumerate() {
                for (f, v) in row.iter().enumerate() {
                    xs[f][r] = *v;
                    has_nan |= v.is_nan();
                }
            }
            for x in xs.iter_mut() {
                // A short last block repeats its first row (its results are not used).
                for r in rows..B {
                    x[r] = x[0];
                }
            }
            // Trees in order, each adding its exit leaf's value to every row's sum.
            let mut sum = [0f64; B];
            for (&(lo, hi, end), leaves) in self.tree_entries.iter().zip(&self.leaves) {
                apply(
                    &self.entries[lo as usize..hi as usize],
                    &self.entries[hi as usize..end as usize],
                    &xs,
                    leaves,
                    &mut sum,
                );
            }
            for (r, o) in dst.iter_mut().enumerate() {
                *o = sigmoid(self.base + sum[r]);
            }
            if has_nan {
                for (r, row) in block.chunks_exact(cols).enumerate() {
                    if row.iter().any(|v| v.is_nan()) {
                        dst[r] = self.predict_row_reference(row);
                    }
                }
            }
        }
    }

    /// One row by walking every tree node by node with the model's own tests (missing values
    /// included): the definition the fast kernel is checked against.
    pub fn predict_row_reference(&self, row: &[f32]) -> f32 {
        let mut sum = 0f64;
        for nodes in &self.trees {
            let mut i = 0usize;
            loop {
                match nodes[i] {
                    Node::Leaf { value } => {
                        sum += value as f64;
                        break;
                    }
                    Node::Branch { feature, threshold, mode, missing_true, yes, no } => {
                        let x = row[feature as usize];
                        let go_yes = if x.is_nan() {
                            missing_true
                        } else {
                            match mode {
                                Mode::Leq => x <= threshold,
                                Mode::Lt => x < threshold,
                                Mode::Gte => x >= threshold,
                                Mode::Gt => x > threshold,
                                Mode::Leaf => unreachable!("leaves are Node::Leaf"),
                            }
                        };
                        i = if go_yes { yes } else { no } as usize;
                    }
                }
            }
        }
        sigmoid(self.base + sum)
    }
}

/// The inner loop: for each entry, the rows whose value is above its threshold lose the entry's
/// leaves. One function per instruction set, each written with that set's vector operations
/// (the compiler does not vectorise the mask-and-clear on its own).
mod kernels {
    use super::Entry;

    /// 16 rows as four SSE2 vectors per word on x86-64 (the baseline every x86-64 CPU has; eight
    /// vectors measured slower: the two-operand SSE forms spill registers); plain Rust elsewhere.
    #[inline(always)]
    pub fn portable(lo: &[Entry], hi: &[Entry], xs: &[[f32; 16]], leaves: &[f32; 64], sum: &mut [f64; 16]) {
        let (mut lo_out, mut hi_out) = ([u32::MAX; 16], [u32::MAX; 16]);
        words(lo, hi, xs, &mut lo_out, &mut hi_out);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // The exit leaf is the leftmost bit left set (it always exists); its position is the
            // float exponent of that bit (see `avx2`), 4 rows at a time with SSE2.
            // SAFETY: SSE2 is part of x86-64; loads and stores of 4 lanes inside `[_; 16]`.
            unsafe {
                let zero = _mm_setzero_si128();
                let tz = |x: __m128i| {
                    let bit = _mm_and_si128(x, _mm_sub_epi32(zero, x));
                    let f = _mm_castps_si128(_mm_cvtepi32_ps(bit));
                    _mm_sub_epi32(_mm_and_si128(_mm_srli_epi32::<23>(f), _mm_set1_epi32(0xFF)), _mm_set1_epi32(127))
                };
                for v in 0..4 {
                    let l = _mm_loadu_si128(lo_out.as_ptr().add(4 * v) as *const __m128i);
                    let h = _mm_loadu_si128(hi_out.as_ptr().add(4 * v) as *const __m128i);
                    let from_hi = _mm_add_epi32(tz(h), _mm_set1_epi32(32));
                    let empty = _mm_cmpeq_epi32(l, zero);
                    let idx = _mm_or_si128(_mm_and_si128(empty, from_hi), _mm_andnot_si128(empty, tz(l)));
                    let mut i = [0i32; 4];
                    _mm_storeu_si128(i.as_mut_ptr() as *mut __m128i, _mm_and_si128(idx, _mm_set1_epi32(63)));
                    for (k, i) in i.iter().enumerate() {
                        sum[4 * v + k] += leaves[*i as usize] as f64;
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (r, s) in sum.iter_mut().enumerate() {
            // The exit leaf is the leftmost bit left set; it always exists.
            let v = lo_out[r] as u64 | (hi_out[r] as u64) << 32;
            *s += leaves[v.trailing_zeros() as usize & 63] as f64;
        }
    }

    #[inline(always)]
    fn words(lo: &[Entry], hi: &[Entry], xs: &[[f32; 16]], lo_out: &mut [u32; 16], hi_out: &mut [u32; 16]) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // SAFETY: SSE2 is part of x86-64; every load and store is of 4 lanes inside a
            // `[_; 16]`; entry features are below the row width (checked when the model loads).
            unsafe {
                for (entries, out) in [(lo, lo_out), (hi, hi_out)] {
                    let mut w = [_mm_set1_epi32(-1); 4];
                    for e in entries {
                        let t = _mm_set1_ps(e.threshold);
                        let c = _mm_set1_epi32(e.clear as i32);
                        let x = xs.get_unchecked(e.feature as usize).as_ptr();
                        for (v, w) in w.iter_mut().enumerate() {
                            let m = _mm_castps_si128(_mm_cmplt_ps(t, _mm_loadu_ps(x.add(4 * v))));
                            *w = _mm_andnot_si128(_mm_and_si128(m, c), *w);
                        }
                    }
                    for (v, w) in w.iter().enumerate() {
                        _mm_storeu_si128(out.as_mut_ptr().add(4 * v) as *mut __m128i, *w);
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (entries, out) in [(lo, lo_out), (hi, hi_out)] {
            *out = [u32::MAX; 16];
            for e in entries {
                for (b, v) in out.iter_mut().zip(&xs[e.feature as usize]) {
                    *b &= !(((*v > e.threshold) as u32).wrapping_neg() & e.clear);
                }
            }
        }
    }

    /// 64 rows as eight AVX2 vectors per word, kept in registers for the whole tree.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn avx2(lo: &[Entry], hi: &[Entry], xs: &[[f32; 64]], leaves: &[f32; 64], sum: &mut [f64; 64]) {
        use std::arch::x86_64::*;
        let (mut lo_out, mut hi_out) = ([0u32; 64], [0u32; 64]);
        // SAFETY: AVX2 is present (caller); every load and store is of 8 lanes inside a
        // `[_; 64]`; entry features are below the row width (checked when the model loads).
        unsafe {
            for (entries, out) in [(lo, &mut lo_out), (hi, &mut hi_out)] {
                let mut w = [_mm256_set1_epi32(-1); 8];
                for e in entries {
                    let t = _mm256_set1_ps(e.threshold);
                    let c = _mm256_set1_epi32(e.clear as i32);
                    let x = xs.get_unchecked(e.feature as usize).as_ptr();
                    for (v, w) in w.iter_mut().enumerate() {
                        let m = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(t, _mm256_loadu_ps(x.add(8 * v))));
                        *w = _mm256_andnot_si256(_mm256_and_si256(m, c), *w);
                    }
                }
                for (v, w) in w.iter().enumerate() {
                    _mm256_storeu_si256(out.as_mut_ptr().add(8 * v) as *mut __m256i, *w);
                }
            }
            // Exit leaves, 8 rows at a time: the lowest set bit's position is the exponent of
            // the bit converted to float (x & -x is a power of two; 2^31 converts to -2^31, whose
            // exponent field is still 31 + 127). The index is masked to 0..63, so the gather stays
            // inside `leaves` even if a word were empty (it never is: the exit leaf stays set).
            let zero = _mm256_setzero_si256();
            let tz = |x: __m256i| {
                let bit = _mm256_and_si256(x, _mm256_sub_epi32(zero, x));
                let f = _mm256_castps_si256(_mm256_cvtepi32_ps(bit));
                _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_srli_epi32::<23>(f), _mm256_set1_epi32(0xFF)),
                    _mm256_set1_epi32(127),
                )
            };
            for v in 0..8 {
                let l = _mm256_loadu_si256(lo_out.as_ptr().add(8 * v) as *const __m256i);
                let h = _mm256_loadu_si256(hi_out.as_ptr().add(8 * v) as *const __m256i);
                let from_hi = _mm256_add_epi32(tz(h), _mm256_set1_epi32(32));
                let idx = _mm256_blendv_epi8(tz(l), from_hi, _mm256_cmpeq_epi32(l, zero));
                let idx = _mm256_and_si256(idx, _mm256_set1_epi32(63));
                let value = _mm256_i32gather_ps::<4>(leaves.as_ptr(), idx);
                let s = sum.as_mut_ptr().add(8 * v);
                let low = _mm256_add_pd(_mm256_loadu_pd(s), _mm256_cvtps_pd(_mm256_castps256_ps128(value)));
                let high = _mm256_add_pd(_mm256_loadu_pd(s.add(4)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(value)));
                _mm256_storeu_pd(s, low);
                _mm256_storeu_pd(s.add(4), high);
            }
        }
    }
}

fn sigmoid(z: f64) -> f32 {
    (1.0 / (1.0 + (-z).exp())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed() -> (TreeEnsemble, usize) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        let inputs = m["stage1"]["inputs"].as_array().unwrap().len();
        (TreeEnsemble::from_onnx_file(&dir.join("stage1_gbdt.onnx"), inputs).unwrap(), inputs)
    }

    /// Rows spread over each feature's thresholds (and exactly on them), so every branch is taken
    /// both ways.
    fn probe_rows(e: &TreeEnsemble, n: usize) -> Vec<f32> {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut data = vec![0f32; n * e.inputs];
        for r in 0..n {
            for f in 0..e.inputs {
                let es: Vec<&Entry> = e.entries.iter().filter(|x| x.feature as usize == f).collect();
                data[r * e.inputs + f] = if es.is_empty() {
                    0.0
                } else {
                    let t = es[(next() % es.len() as u64) as usize].threshold;
                    match next() % 3 {
                        0 => t,
                        1 => t.next_up(),
                        _ => t + (next() % 1000) as f32 / 100.0 - 5.0,
                    }
                };
            }
        }
        data
    }

    #[test]
    fn both_kernels_equal_the_reference_traversal() {
        let (e, inputs) = deployed();
        let data = probe_rows(&e, 777);
        for kernel in [Kernel::Portable, Kernel::Avx2] {
            let e = TreeEnsemble::from_onnx_file(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("models/stage1_gbdt.onnx"),
                inputs,
            )
            .unwrap()
            .with_kernel(kernel);
            let mut out = vec![];
            e.predict(&data, &mut out).unwrap();
            assert_eq!(out.len(), 777);
            for (r, row) in data.chunks(inputs).enumerate() {
                assert_eq!(out[r], e.predict_row_reference(row), "row {r}, kernel {}", e.kernel().name());
            }
        }
    }

    #[test]
    fn rows_with_missing_values_follow_the_model() {
        // The deployed model has BRANCH_LEQ nodes without missing-value tracks: a NaN fails every
        // test (`NaN <= t` is false), which is where +inf goes, so the NaN rows (slow path) must
        // score as the same rows with +inf do through the block kernel.
        let (e, inputs) = deployed();
        assert!(e
            .trees
            .iter()
            .flatten()
            .all(|n| matches!(n, Node::Leaf { .. } | Node::Branch { mode: Mode::Leq, missing_true: false, .. })));
        let mut with_nan = probe_rows(&e, 40);
        let mut with_inf = with_nan.clone();
        for r in (0..40).step_by(3) {
            with_nan[r * inputs + (r * 7 % inputs)] = f32::NAN;
            with_inf[r * inputs + (r * 7 % inputs)] = f32::INFINITY;
        }
        let (mut a, mut b) = (vec![], vec![]);
        e.predict(&with_nan, &mut a).unwrap();
        e.predict(&with_inf, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn unsupported_models_are_refused_with_the_reason() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let (_, inputs) = deployed();
        let err = TreeEnsemble::from_onnx_file(&dir.join("stage2_mlp.onnx"), inputs).unwrap_err().to_string();
        assert!(err.contains("expected TreeEnsembleRegressor"), "{err}");
        let err = TreeEnsemble::from_onnx(b"\x01\x02garbage", inputs).unwrap_err().to_string();
        assert!(err.contains("not an ONNX model"), "{err}");
        let err = TreeEnsemble::from_onnx_file(&dir.join("stage1_gbdt.onnx"), inputs + 1).unwrap_err().to_string();
        assert!(err.contains("reads 45 inputs, the manifest names 46"), "{err}");
    }
}
