//! What a kernel sees of its step: attributes with ONNX defaults, the opset, input access.

use kiln_runtime::manifest::{Attr, AttrKind, Program, Step};
use kiln_runtime::{Artifact, Error, Result, Tensor};

pub struct OpCtx<'a> {
    pub step: &'a Step,
    pub artifact: Option<&'a Artifact>,
}

impl<'a> OpCtx<'a> {
    pub fn new(step: &'a Step, artifact: Option<&'a Artifact>) -> OpCtx<'a> {
        OpCtx { step, artifact }
    }

    pub fn op(&self) -> &str {
        &self.step.op
    }

    /// The opset version of the op's domain that the model imports.
    pub fn opset(&self) -> i64 {
        self.step.opset
    }

    pub fn name(&self) -> &str {
        &self.step.name
    }

    /// How many outputs the step has (including omitted optional ones).
    pub fn num_outputs(&self) -> usize {
        self.step.outputs.len()
    }

    /// Whether output `i` is bound (not omitted).
    pub fn output_wanted(&self, i: usize) -> bool {
        self.step.outputs.get(i).is_some_and(|&v| v >= 0)
    }

    fn attr(&self, name: &str) -> Option<&'a Attr> {
        self.step.attrs.iter().find(|a| a.name == name)
    }

    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    pub fn attr_i_opt(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }

    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        self.attr_i_opt(name).unwrap_or(default)
    }

    pub fn attr_f_opt(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }

    pub fn attr_f(&self, name: &str, default: f32) -> f32 {
        self.attr_f_opt(name).unwrap_or(default)
    }

    pub fn attr_s_opt(&self, name: &str) -> Option<String> {
        self.attr(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    pub fn attr_s(&self, name: &str, default: &str) -> String {
        self.attr_s_opt(name).unwrap_or_else(|| default.to_string())
    }

    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    pub fn attr_floats(&self, name: &str) -> Option<Vec<f32>> {
        self.attr(name).map(|a| a.floats.clone())
    }

    pub fn attr_strings(&self, name: &str) -> Option<Vec<String>> {
        self.attr(name)
            .map(|a| a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
    }

    pub fn attr_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self.attr(name).and_then(|a| a.t.as_ref()) {
            Some(t) => Ok(Some(kiln_runtime::artifact::tensor_from_data(t, self.artifact)?)),
            None => Ok(None),
        }
    }

    pub fn attr_graph(&self, name: &str) -> Option<&'a Program> {
        self.attr(name).and_then(|a| a.g.as_ref())
    }

    pub fn attr_kind(&self, name: &str) -> Option<AttrKind> {
        self.attr(name).map(|a| a.kind())
    }

    /// A required input.
    pub fn input<'t>(&self, inputs: &'t [Option<Tensor>], i: usize) -> Result<&'t Tensor> {
        inputs.get(i).and_then(|t| t.as_ref()).ok_or_else(|| {
            Error::Other(format!("required input {i} is missing"))
        })
    }

    /// An optional input.
    pub fn opt_input<'t>(&self, inputs: &'t [Option<Tensor>], i: usize) -> Option<&'t Tensor> {
        inputs.get(i).and_then(|t| t.as_ref())
    }

    /// An error naming this op as unsupported in the given configuration.
    pub fn unsupported(&self, detail: impl Into<String>) -> Error {
        Error::Unsupported {
            op: self.step.op.clone(),
            domain: self.step.domain.clone(),
            opset: self.step.opset,
            node: self.step.name.clone(),
            detail: detail.into(),
        }
    }
}
