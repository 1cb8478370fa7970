//! Reads a tree ensemble out of an ONNX file: just the messages and fields this needs, declared
//! with prost by their tags in `onnx.proto` (no generated ONNX bindings, no protoc step). The
//! accepted graph is what training exports for stage 1 — `TreeEnsembleRegressor` (one target,
//! SUM) followed by `Sigmoid`, or the regressor with `post_transform = LOGISTIC` — anything else
//! is refused with the reason.
use prost::Message;

use super::TreeError;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<ShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<DimProto>,
}

#[derive(Clone, PartialEq, Message)]
struct DimProto {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    domain: String,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    /// Present for `*_as_tensor` attributes, which this reader refuses.
    #[prost(bytes = "vec", optional, tag = "5")]
    t: Option<Vec<u8>>,
    #[prost(float, repeated, tag = "7")]
    floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    strings: Vec<Vec<u8>>,
}

/// How a node compares its feature with its threshold (ONNX `nodes_modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Leaf,
}

/// The ensemble as the ONNX attributes give it: flat node arrays, leaves by (tree, node id).
#[derive(Debug, Default)]
pub struct RawEnsemble {
    pub inputs: Option<usize>,
    pub tree_ids: Vec<i64>,
    pub node_ids: Vec<i64>,
    pub features: Vec<i64>,
    pub thresholds: Vec<f32>,
    pub modes: Vec<Mode>,
    pub true_ids: Vec<i64>,
    pub false_ids: Vec<i64>,
    pub missing_true: Vec<bool>,
    pub target_trees: Vec<i64>,
    pub target_nodes: Vec<i64>,
    pub target_weights: Vec<f32>,
    pub base: f32,
}

pub fn read(bytes: &[u8]) -> Result<RawEnsemble, TreeError> {
    let model = ModelProto::decode(bytes).map_err(|e| TreeError::Format(format!("not an ONNX model: {e}")))?;
    let graph = model.graph.ok_or_else(|| TreeError::Format("the model has no graph".into()))?;
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    let (te, logistic_after) = match ops.as_slice() {
        ["TreeEnsembleRegressor"] => (&graph.node[0], false),
        ["TreeEnsembleRegressor", "Sigmoid"] if graph.node[1].input.first() == graph.node[0].output.first() => {
            (&graph.node[0], true)
        }
        _ => {
            return Err(TreeError::Unsupported(format!(
                "graph {ops:?}: expected TreeEnsembleRegressor, optionally followed by Sigmoid"
            )))
        }
    };
    if te.domain != "ai.onnx.ml" {
        return Err(TreeError::Unsupported(format!("TreeEnsembleRegressor in domain `{}`", te.domain)));
    }
    if logistic_after && !matches!(graph.node[1].domain.as_str(), "" | "ai.onnx") {
        return Err(TreeError::Unsupported(format!("Sigmoid in domain `{}`", graph.node[1].domain)));
    }
    // The graph must read one float matrix and answer with the last node's output.
    let input = graph.input.first().ok_or_else(|| TreeError::Format("the graph has no input".into()))?;
    if te.input.first() != Some(&input.name) {
        return Err(TreeError::Format("the tree ensemble does not read the graph's input".into()));
    }
    const FLOAT: i32 = 1;
    if let Some(t) = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()) {
        if t.elem_type != FLOAT {
            return Err(TreeError::Unsupported(format!("input element type {} (float is supported)", t.elem_type)));
        }
    }
    let last = graph.node.last().and_then(|n| n.output.first());
    if last.is_none() || graph.output.first().map(|o| &o.name) != last {
        return Err(TreeError::Format("the graph's output is not its last node's output".into()));
    }
    let mut raw = RawEnsemble { inputs: input_width(&graph), ..Default::default() };
    let mut post = "NONE".to_string();
    let mut aggregate = "SUM".to_string();
    let mut n_targets = 1;
    let mut base_values = vec![];
    for a in &te.attribute {
        if a.t.is_some() {
            return Err(TreeError::Unsupported(format!("attribute {} given as a tensor", a.name)));
        }
        let text = || String::from_utf8_lossy(&a.s).into_owned();
        match a.name.as_str() {
            "nodes_treeids" => raw.tree_ids = a.ints.clone(),
            "nodes_nodeids" => raw.node_ids = a.ints.clone(),
            "nodes_featureids" => raw.features = a.ints.clone(),
            "nodes_values" => raw.thresholds = a.floats.clone(),
            "nodes_truenodeids" => raw.true_ids = a.ints.clone(),
            "nodes_falsenodeids" => raw.false_ids = a.ints.clone(),
            "nodes_missing_value_tracks_true" => raw.missing_true = a.ints.iter().map(|v| *v != 0).collect(),
            "nodes_modes" => {
                raw.modes = a
                    .strings
                    .iter()
                    .map(|m| match m.as_slice() {
                        b"BRANCH_LEQ" => Ok(Mode::Leq),
                        b"BRANCH_LT" => Ok(Mode::Lt),
                        b"BRANCH_GTE" => Ok(Mode::Gte),
                        b"BRANCH_GT" => Ok(Mode::Gt),
                        b"LEAF" => Ok(Mode::Leaf),
                        other => Err(TreeError::Unsupported(format!(
                            "node mode {} (supported: BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT, LEAF)",
                            String::from_utf8_lossy(other)
                        ))),
                    })
                    .collect::<Result<_, _>>()?
            }
            "target_treeids" => raw.target_trees = a.ints.clone(),
            "target_nodeids" => raw.target_nodes = a.ints.clone(),
            "target_ids" => {
                if a.ints.iter().any(|t| *t != 0) {
                    return Err(TreeError::Unsupported("more than one target".into()));
                }
            }
            "target_weights" => raw.target_weights = a.floats.clone(),
            "n_targets" => n_targets = a.i,
            "post_transform" => post = text(),
            "aggregate_function" => aggregate = text(),
            "base_values" => base_values = a.floats.clone(),
            "nodes_hitrates" => {}
            other => return Err(TreeError::Unsupported(format!("attribute {other}"))),
        }
    }
    if n_targets != 1 {
        return Err(TreeError::Unsupported(format!("n_targets = {n_targets} (one is supported)")));
    }
    if aggregate != "SUM" {
        return Err(TreeError::Unsupported(format!("aggregate_function {aggregate} (SUM is supported)")));
    }
    match (post.as_str(), logistic_after) {
        ("NONE", true) | ("LOGISTIC", false) => {}
        ("NONE", false) => return Err(TreeError::Unsupported("no sigmoid: stage 1 must output a probability".into())),
        (p, _) => return Err(TreeError::Unsupported(format!("post_transform {p}"))),
    }
    raw.base = match base_values.as_slice() {
        [] => 0.0,
        [b] => *b,
        _ => return Err(TreeError::Unsupported("more than one base value".into())),
    };
    Ok(raw)
}

/// The declared row width of the graph's input, when the file gives it.
fn input_width(graph: &GraphProto) -> Option<usize> {
    let t = graph.input.first()?.r#type.as_ref()?.tensor_type.as_ref()?;
    let d = t.shape.as_ref()?.dim.get(1)?.dim_value?;
    usize::try_from(d).ok()
}
