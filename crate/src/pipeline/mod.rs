//! SDXL pipelines assembled from the models, following diffusers' StableDiffusionXL pipelines.

pub mod crop;
pub mod generate;
pub mod image;
pub mod lora;
pub mod lpw;
pub mod prompt;
pub mod quality;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::weights::{read_json, Source};

/// The parts of `model_index.json` the pipelines use.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// diffusers' `force_zeros_for_empty_prompt` (default true): no negative prompt means zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// Set on the refiner: aesthetic scores replace target size in the time ids.
    pub requires_aesthetics_score: bool,
    components: serde_json::Map<String, Value>,
}

impl ModelIndex {
    pub async fn load(source: &impl Source) -> Result<ModelIndex> {
        let path = "model_index.json";
        let Value::Object(map) = read_json::<Value>(source, path).await? else {
            return Err(Error::Config { path: source.describe(path), message: "not a JSON object".into() });
        };
        let flag = |key: &str, default: bool| map.get(key).and_then(Value::as_bool).unwrap_or(default);
        Ok(ModelIndex {
            force_zeros_for_empty_prompt: flag("force_zeros_for_empty_prompt", true),
            requires_aesthetics_score: flag("requires_aesthetics_score", false),
            components: map,
        })
    }

    /// Whether the folder declares component `name` (diffusers writes `[null, null]` for absent ones).
    pub fn has(&self, name: &str) -> bool {
        matches!(self.components.get(name), Some(Value::Array(a)) if a.iter().all(|v| !v.is_null()))
    }
}
