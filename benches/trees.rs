//! Stage-1 engines side by side on the same real batch: the native tree evaluator (AVX2 and
//! portable kernels) and ONNX Runtime (one session, one thread, as a scorer runs it), on 1000
//! rows the node served (`models/stage1_reference.bin`), each given the batch as the node gives
//! it: ONNX Runtime sorted by the manifest's `batch_order` (faster for its traversal), the native
//! engine in candidate order (sorting does not help it). Prints p50/p99 wall time, CPU time per
//! batch (this thread's, so other processes on a shared machine count less) and the ratios.
//! `cargo bench --bench trees` (needs `scripts/setup.sh` for libonnxruntime).
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::Criterion;
use recsys::config::Config;
use recsys::features::FeaturePlan;
use recsys::scoring::trees::reference::ServedReference;
use recsys::scoring::trees::{Kernel, TreeEnsemble};
use recsys::scoring::{self, Manifest};

mod common;
use common::summary;

fn main() {
    let mut c = Criterion::default().configure_from_args().measurement_time(Duration::from_secs(3));
    let cfg = Config::load(Path::new("config/node.toml")).expect("run from the repository root");
    let plan = FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).unwrap();
    let manifest = Manifest::load(Path::new("models"), &plan).unwrap();
    let reference = ServedReference::load(&manifest.dir.join("stage1_reference.bin")).unwrap();
    let cols = reference.cols;
    // 1000 served rows, ordered by batch_order as the node orders a stage-1 batch.
    let order_col =
        manifest.stage1.batch_order.first().and_then(|n| manifest.stage1.inputs.iter().position(|i| i == n));
    let mut idx: Vec<usize> = (0..1000).collect();
    let batch: Vec<f32> = reference.rows[..1000 * cols].to_vec();
    if let Some(c) = order_col {
        idx.sort_by(|a, b| reference.rows[a * cols + c].total_cmp(&reference.rows[b * cols + c]));
    }
    let sorted: Vec<f32> = idx.iter().flat_map(|i| reference.rows[i * cols..(i + 1) * cols].iter().copied()).collect();

    let path = manifest.dir.join(&manifest.stage1.file);
    let native = TreeEnsemble::from_onnx_file(&path, cols).unwrap();
    let portable = TreeEnsemble::from_onnx_file(&path, cols).unwrap().with_kernel(Kernel::Portable);
    let best = native.kernel().name();
    let mut out = Vec::with_capacity(1000);
    c.bench_function(&format!("native_{best}_1000"), |b| {
        b.iter(|| {
            out.clear();
            native.predict(black_box(&batch), &mut out).unwrap();
        })
    });
    c.bench_function("native_portable_1000", |b| {
        b.iter(|| {
            out.clear();
            portable.predict(black_box(&batch), &mut out).unwrap();
        })
    });
    let Some(lib) = scoring::find_runtime(None) else {
        println!("libonnxruntime not found: run scripts/setup.sh for the ONNX Runtime side");
        return;
    };
    scoring::init_runtime(&lib).unwrap();
    let mut ort = scoring::load_model(&manifest.dir, &manifest.stage1).unwrap();
    c.bench_function("ort_1000", |b| b.iter(|| black_box(ort.run(1000, cols, black_box(&sorted)).unwrap())));
    c.final_summary();

    let n = summary(&format!("native_{best}_1000"), || {
        out.clear();
        native.predict(&batch, &mut out).unwrap();
    });
    let p = summary("native_portable_1000", || {
        out.clear();
        portable.predict(&batch, &mut out).unwrap();
    });
    let o = summary("ort_1000", || {
        black_box(ort.run(1000, cols, &sorted).unwrap());
    });
    println!(
        "ort / native_{best}: {:.1}x wall p50, {:.1}x CPU; ort / native_portable: {:.1}x wall p50, {:.1}x CPU",
        o.0 / n.0,
        o.1 / n.1,
        o.0 / p.0,
        o.1 / p.1
    );
}
