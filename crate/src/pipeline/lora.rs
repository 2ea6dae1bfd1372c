//! LoRAs on a loaded model: the files (crate::weights::lora) resolved against the model's layers,
//! each adapted layer given its side path (crate::adapt). Set between generations; the base's
//! weights are never touched.

use std::collections::BTreeMap;

use crate::adapt::LowRank;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::pipeline::generate::SdxlModel;
use crate::weights::lora::{Adaptable, LoraFile, Target};
use crate::weights::names::Layout;

/// One LoRA a generation runs with, at its weight (negative weights subtract it).
pub struct LoraChoice<'f, 'a> {
    pub file: &'f LoraFile<'a>,
    pub weight: f32,
}

impl SdxlModel {
    /// The layers LoRAs may adapt (the UNet's and the text encoders' Linear and Conv2d weights).
    pub fn adaptable(&self) -> Adaptable {
        let layers = self.layers.iter().map(|(c, l)| (*c, l.layers().iter().map(|(name, layer)| (name.clone(), layer.shape.clone())).collect())).collect();
        let unet_layers = self.unet.layout.down.iter().map(|b| b.resnet_in.len()).collect();
        Adaptable { layers, layout: Layout { unet_layers, linear_projection: self.unet.config.use_linear_projection, vae_levels: 0 } }
    }

    /// Runs the next generations with `loras` (none: the base alone), replacing those set before.
    /// Every file is checked against the model before any layer changes; a LoRA at weight 0 is
    /// left out. On an error no LoRA stays set.
    pub async fn set_loras(&self, gpu: &Gpu, loras: &[LoraChoice<'_, '_>]) -> Result<()> {
        self.clear_loras();
        let adaptable = self.adaptable();
        let mut layers: BTreeMap<(&'static str, String), Vec<(&LoraChoice, Target)>> = BTreeMap::new();
        for lora in loras {
            if !lora.weight.is_finite() {
                return Err(Error::InvalidParameter(format!("LoRA {}: weight {} is not a number", lora.file.location(), lora.weight)));
            }
            if lora.weight == 0.0 {
                continue;
            }
            for target in lora.file.resolve(&adaptable)? {
                layers.entry((target.component, target.layer.clone())).or_default().push((lora, target));
            }
        }
        let set = async {
            for ((component, layer), targets) in &layers {
                self.layers[component].set(layer, Some(self.stacked(gpu, component, layer, targets).await?))?;
            }
            Ok(())
        };
        gpu.operation(set).await.inspect_err(|_| self.clear_loras())
    }

    /// Back to the base alone.
    pub fn clear_loras(&self) {
        self.layers.values().for_each(|l| l.clear());
    }

    /// The side path of one layer: every LoRA's A stacked along the rank, and B likewise with each
    /// LoRA's weight · alpha / rank folded into its columns.
    async fn stacked(&self, gpu: &Gpu, component: &str, name: &str, targets: &[(&LoraChoice<'_, '_>, Target)]) -> Result<LowRank> {
        let (shape, dtype) = {
            let layers = self.layers[component].layers();
            (layers[name].shape.clone(), layers[name].dtype)
        };
        let out = shape[0];
        let rank: usize = targets.iter().map(|(_, t)| t.rank).sum();
        let (mut down, mut up) = (Vec::new(), vec![0.0f32; out * rank]);
        let mut column = 0;
        for (lora, target) in targets {
            let factors = lora.file.factors(target).await?;
            down.extend_from_slice(&factors.down);
            let scale = lora.weight * factors.scale;
            for (o, row) in factors.up.chunks_exact(target.rank).enumerate() {
                for (r, v) in row.iter().enumerate() {
                    up[o * rank + column + r] = v * scale;
                }
            }
            column += target.rank;
        }
        LowRank::upload(gpu, &down, &up, rank, &shape, dtype, &format!("{component}.{name}"))
    }
}

/// AUTOMATIC1111's LoRA tags in a prompt, `<lora:NAME:WEIGHT>` (`<lora:NAME>`: weight 1): the
/// prompt without them, and each tag's (name, weight) in order.
pub fn prompt_tags(prompt: &str) -> Result<(String, Vec<(String, f32)>)> {
    const OPEN: &str = "<lora:";
    let (mut text, mut tags, mut rest) = (String::new(), Vec::new(), prompt);
    while let Some(start) = rest.find(OPEN) {
        text += &rest[..start];
        let tag = &rest[start + OPEN.len()..];
        let end = tag.find('>').ok_or_else(|| Error::InvalidParameter(format!("unclosed LoRA tag '{}'", &rest[start..])))?;
        let bad = || Error::InvalidParameter(format!("LoRA tag '<lora:{}>' must be <lora:NAME:WEIGHT> or <lora:NAME>", &tag[..end]));
        let (name, weight) = match tag[..end].split_once(':') {
            Some((name, weight)) => (name, weight.trim().parse::<f32>().ok().filter(|w| w.is_finite()).ok_or_else(bad)?),
            None => (&tag[..end], 1.0),
        };
        if name.trim().is_empty() {
            return Err(bad());
        }
        tags.push((name.trim().to_string(), weight));
        rest = &tag[end + 1..];
    }
    text += rest;
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::prompt_tags;

    #[test]
    fn lora_tags_are_read_and_removed() {
        let (text, tags) = prompt_tags("a fox <lora:ink:0.8>, snow<lora:fox style> <lora:x:-0.5>").unwrap();
        assert_eq!(text, "a fox , snow ");
        assert_eq!(tags, vec![("ink".to_string(), 0.8), ("fox style".to_string(), 1.0), ("x".to_string(), -0.5)]);
        assert_eq!(prompt_tags("no tags (x:1.2)").unwrap(), ("no tags (x:1.2)".to_string(), vec![]));
        for bad in ["<lora:ink:0.8", "<lora::1>", "<lora:ink:strong>", "<lora:ink:0.5:0.3>", "<lora:ink:inf>"] {
            let err = prompt_tags(bad).unwrap_err();
            assert_eq!(err.kind(), "InvalidParameter", "{bad}: {err}");
        }
    }
}
