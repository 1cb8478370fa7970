//! The native stage-1 engine gives the trained model's answers: on the 20,000 served rows the
//! training script stored with LightGBM's own p(click) (`models/stage1_reference.bin`), every
//! score equals LightGBM's and ONNX Runtime's to 1e-6 and every request's ranking is the same.
use std::path::Path;

use recsys::config::Config;
use recsys::features::FeaturePlan;
use recsys::scoring::trees::reference::ServedReference;
use recsys::scoring::trees::{Kernel, TreeEnsemble};
use recsys::scoring::{self, Manifest};

const TOLERANCE: f64 = 1e-6;

fn deployed() -> (Manifest, ServedReference) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = Config::load(&root.join("config/node.toml")).unwrap();
    let plan = FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).unwrap();
    let manifest = Manifest::load(&root.join("models"), &plan).unwrap();
    let reference = ServedReference::load(&manifest.dir.join("stage1_reference.bin")).unwrap();
    assert!(reference.len() >= 20_000, "{} reference rows", reference.len());
    assert_eq!(reference.cols, manifest.stage1.inputs.len());
    (manifest, reference)
}

/// Row order of one request by descending score, ties by position (as the ranking stage sorts).
fn ranking(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
    idx
}

/// Largest difference, and the requests whose ranking differs.
fn compare(name: &str, ours: &[f64], theirs: &[f64], reference: &ServedReference) -> (f64, usize) {
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let reordered =
        reference.requests().into_iter().filter(|r| ranking(&ours[r.clone()]) != ranking(&theirs[r.clone()])).count();
    println!("{name}: {} rows, max |diff| {worst:.2e}, requests ranked differently {reordered}", ours.len());
    (worst, reordered)
}

#[test]
fn native_engine_equals_lightgbm_and_onnx_runtime_on_served_rows() {
    let (manifest, reference) = deployed();
    let path = manifest.dir.join(&manifest.stage1.file);
    let lightgbm = &reference.lightgbm;
    for kernel in [Kernel::Avx2, Kernel::Portable] {
        let engine = TreeEnsemble::from_onnx_file(&path, reference.cols).unwrap().with_kernel(kernel);
        let mut out = vec![];
        engine.predict(&reference.rows, &mut out).unwrap();
        let native: Vec<f64> = out.iter().map(|v| *v as f64).collect();
        let (worst, reordered) =
            compare(&format!("native {} vs LightGBM", engine.kernel().name()), &native, lightgbm, &reference);
        assert!(worst <= TOLERANCE, "native {} differs from LightGBM by {worst:e}", engine.kernel().name());
        assert_eq!(reordered, 0, "requests ranked differently from LightGBM");
    }

    let lib = scoring::find_runtime(None).expect("libonnxruntime: run scripts/setup.sh");
    scoring::init_runtime(&lib).unwrap();
    let mut ort = scoring::load_model(&manifest.dir, &manifest.stage1).unwrap();
    let ort_out: Vec<f64> =
        ort.run(reference.len(), reference.cols, &reference.rows).unwrap().into_iter().map(|v| v as f64).collect();
    let engine = TreeEnsemble::from_onnx_file(&path, reference.cols).unwrap();
    let mut out = vec![];
    engine.predict(&reference.rows, &mut out).unwrap();
    let native: Vec<f64> = out.iter().map(|v| *v as f64).collect();
    let (worst, reordered) = compare("native vs ONNX Runtime", &native, &ort_out, &reference);
    assert!(worst <= TOLERANCE, "native differs from ONNX Runtime by {worst:e}");
    assert_eq!(reordered, 0, "requests ranked differently from ONNX Runtime");

    // Missing values: the same rows with NaNs put in (a third of them, different columns) score
    // as ONNX Runtime scores them.
    let mut holes = reference.rows[..3000 * reference.cols].to_vec();
    for r in (0..3000).step_by(3) {
        holes[r * reference.cols + (r * 7) % reference.cols] = f32::NAN;
    }
    let ort_holes = ort.run(3000, reference.cols, &holes).unwrap();
    let mut native_holes = vec![];
    engine.predict(&holes, &mut native_holes).unwrap();
    let worst = ort_holes.iter().zip(&native_holes).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    println!("rows with missing values, native vs ONNX Runtime: max |diff| {worst:.2e}");
    assert!(worst <= TOLERANCE, "rows with NaN differ from ONNX Runtime by {worst:e}");
}

#[test]
fn the_best_kernel_this_cpu_runs_is_the_one_used() {
    let (manifest, reference) = deployed();
    let engine = TreeEnsemble::from_onnx_file(&manifest.dir.join(&manifest.stage1.file), reference.cols).unwrap();
    println!("kernel on this CPU: {}", engine.kernel().name());
    assert_eq!(engine.kernel(), Kernel::detect());
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        engine.kernel() == Kernel::Avx2,
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("bmi1")
    );
}
