//! LoRA files: which layers of an SDXL base a LoRA adapts, and its factors, in the namings people
//! have (all safetensors):
//!
//! - **kohya-ss / AUTOMATIC1111** (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` with
//!   `.lora_down.weight`, `.lora_up.weight`, `.alpha`): the UNet's modules under SGM's names with
//!   `_` for `.` (sd-scripts' SDXL) or diffusers' (older trainers); LyCORIS LoCon is the same
//!   with convolutions (A a conv like the layer's, B 1x1).
//! - **diffusers / peft** (`unet.….lora_A.weight` / `lora_B.weight`, `text_encoder.…`,
//!   `text_encoder_2.…`, as `save_lora_weights` writes them) and diffusers' older attention-processor
//!   naming (`….processor.to_q_lora.down.weight`, `….lora_linear_layer.up.weight`).
//!
//! A layer's update is (alpha / rank) · B·A: alpha from the module's `.alpha` tensor, else peft's
//! `lora_alpha` recorded in the file's metadata, else the rank (scale 1), as diffusers loads them.
//! LyCORIS LoHa / LoKr, Tucker (`lora_mid`), DoRA and full-difference files are refused naming
//! the format; keys that are no LoRA factor, and modules that match no layer, are errors listing
//! them: nothing is silently ignored.

use std::collections::{BTreeMap, HashMap};

use super::files::{is_pickle, FileTensors};
use super::names::{sgm_unet_module, Entry, Layout};
use super::{host_f32, safetensors, SharedSource, Source, TensorSource};
use crate::error::{Error, Result};

/// The components LoRAs adapt, as diffusers names them.
pub const COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// AUTOMATIC1111's short hash of a LoRA (its `Lora hashes`): the first 12 hex digits of the
/// sha256 of the data after the header (kohya's "addnet" hash), fed the file's bytes in order.
pub struct ShortHash {
    data_start: u64,
    hasher: sha2::Sha256,
}

impl ShortHash {
    pub fn new(data_start: u64) -> ShortHash {
        ShortHash { data_start, hasher: sha2::Digest::new() }
    }

    /// The file's bytes from offset `at` on (consecutive calls, in order).
    pub fn update(&mut self, at: u64, bytes: &[u8]) {
        let skip = self.data_start.saturating_sub(at).min(bytes.len() as u64) as usize;
        sha2::Digest::update(&mut self.hasher, &bytes[skip..]);
    }

    pub fn finish(self) -> String {
        hex::encode(&sha2::Digest::finalize(self.hasher)[..6])
    }
}

/// Which factor of a module a tensor is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Tensor-name suffixes of the factors, most specific first.
const PARTS: [(&str, Part); 9] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// diffusers' attention-processor LoRAs (`processor.to_q_lora.down.weight`): module suffix, layer.
const PROCESSOR: [(&str, &str); 4] = [(".processor.to_q_lora", ".to_q"), (".processor.to_k_lora", ".to_k"), (".processor.to_v_lora", ".to_v"), (".processor.to_out_lora", ".to_out.0")];

/// Adapter formats this engine does not run, told by their tensors' last name component
/// (prefix), with their names.
const OTHER_FORMATS: [(&str, &str); 7] = [
    ("hada_", "LyCORIS LoHa (hada_w1_a / hada_w2_b)"),
    ("lokr_", "LyCORIS LoKr (lokr_w1 / lokr_w2)"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    ("diff", "a full-weight difference (LyCORIS diff / diff_b)"),
    ("on_input", "(IA)³"),
    ("lora_mid", "LoCon with a Tucker-decomposed middle factor (lora_mid)"),
];

/// The format of tensor `name` when it belongs to one of [`OTHER_FORMATS`].
fn other_format(name: &str) -> Option<&'static str> {
    let mut parts = name.rsplit('.');
    let last = parts.next().unwrap_or_default();
    let last = if last == "weight" { parts.next().unwrap_or_default() } else { last };
    OTHER_FORMATS.iter().find(|(prefix, _)| last.starts_with(prefix)).map(|(_, format)| *format)
}

/// One module a LoRA file adapts: the file's name for it and its factors' tensor names.
#[derive(Debug, Clone)]
struct Module {
    key: String,
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// A LoRA file, opened: its tensors and the modules they adapt.
pub struct LoraFile<'a> {
    source: SharedSource<'a>,
    path: String,
    /// The data section's first byte (after the header).
    data_start: u64,
    tensors: FileTensors<'a>,
    modules: Vec<Module>,
    /// peft's configs per component from the file's metadata, when it records them.
    peft: BTreeMap<String, PeftConfig>,
}

/// The parts of a peft `LoraConfig` that scale a module (diffusers' `save_lora_weights` records
/// it as `lora_adapter_metadata`: one JSON object of `{component}.{field}` entries).
#[derive(Debug, Clone, Default)]
struct PeftConfig {
    lora_alpha: Option<f32>,
    use_rslora: bool,
    /// Module-name suffix → alpha.
    alpha_pattern: Vec<(String, f32)>,
}

/// A model's layers that LoRAs may adapt, per component ([`COMPONENTS`]): module name → weight
/// shape ([out, in] or [out, in, k, k]); and the UNet's block layout, for SGM names.
pub struct Adaptable {
    pub layers: BTreeMap<&'static str, BTreeMap<String, Vec<usize>>>,
    pub layout: Layout,
}

/// One module of a LoRA resolved to the layer it adapts.
#[derive(Debug, Clone)]
pub struct Target {
    module: usize,
    pub component: &'static str,
    pub layer: String,
    pub rank: usize,
}

/// A target's factors on the CPU: A [rank, in·k·k], B [out, rank], and alpha / rank.
pub struct Factors {
    pub down: Vec<f32>,
    pub up: Vec<f32>,
    pub scale: f32,
}

impl<'a> LoraFile<'a> {
    /// Opens the LoRA file `path` of `source` (a safetensors file) and sorts its tensors into
    /// modules, refusing other adapter formats.
    pub async fn open(source: impl Source + 'a, path: &str) -> Result<LoraFile<'a>> {
        let location = source.describe(path);
        if is_pickle(path) {
            return Err(Error::Unsupported { path: location, message: "pickle LoRAs (.pt, .ckpt, .bin) are not read: loading one runs code; use its .safetensors".into() });
        }
        let header = safetensors::read_header(&source, path).await?;
        let (peft, data_start) = (peft_configs(&header.metadata), header.data_start);
        let source = SharedSource::new(source);
        let entries = header.tensors.into_iter().map(|(name, t)| (name, Entry::safetensors(0, t)));
        let tensors = FileTensors::new(source.clone(), vec![path.to_string()], entries);
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        let mut strangers = Vec::new();
        for name in tensors.names() {
            if let Some(format) = other_format(name) {
                return Err(Error::Unsupported { path: location, message: format!("{format} adapters are not supported, only LoRA and LoCon (tensor {name})") });
            }
            let Some((key, part)) = PARTS.iter().find_map(|(suffix, part)| name.strip_suffix(suffix).map(|key| (key, *part))) else {
                strangers.push(name.to_string());
                continue;
            };
            let module = modules.entry(key.to_string()).or_insert_with(|| Module { key: key.to_string(), down: None, up: None, alpha: None });
            let slot = match part {
                Part::Down => &mut module.down,
                Part::Up => &mut module.up,
                Part::Alpha => &mut module.alpha,
            };
            *slot = Some(name.to_string());
        }
        if !strangers.is_empty() {
            return Err(Error::Unsupported { path: location, message: format!("{} tensors are no LoRA factor (lora_down / lora_up / lora_A / lora_B / alpha), e.g. {:?}", strangers.len(), sample(&strangers)) });
        }
        if modules.is_empty() {
            return Err(Error::Unsupported { path: location, message: "no LoRA factors in the file".into() });
        }
        if let Some(m) = modules.values().find(|m| m.down.is_none() || m.up.is_none()) {
            let missing = if m.down.is_none() { "down (A)" } else { "up (B)" };
            return Err(Error::Tensor { path: location, tensor: m.key.clone(), message: format!("the module has no {missing} factor") });
        }
        Ok(LoraFile { source, path: path.to_string(), data_start, tensors, modules: modules.into_values().collect(), peft })
    }

    pub fn location(&self) -> String {
        self.tensors.location()
    }

    /// Where the tensor data begins (after the header): what [`ShortHash`] hashes.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The file's [`ShortHash`], read 16 MiB at a time.
    pub async fn short_hash(&self) -> Result<String> {
        const CHUNK: u64 = 16 << 20;
        let end = self.source.len(&self.path).await?;
        let mut hash = ShortHash::new(self.data_start);
        for chunk in (0..end).step_by(CHUNK as usize) {
            let (start, stop) = (chunk.max(self.data_start), (chunk + CHUNK).min(end));
            if start < stop {
                hash.update(start, &self.source.read_range(&self.path, start, stop).await?);
            }
        }
        Ok(hash.finish())
    }

    /// The layer each module adapts, its factors' shapes checked against the layer's. A module
    /// for no layer of `model`, or for a layer of another shape, is [`Error::WrongModel`] naming them.
    pub fn resolve(&self, model: &Adaptable) -> Result<Vec<Target>> {
        let wrong = |message: String| Error::WrongModel { path: self.location(), message };
        if let Some(m) = self.modules.iter().find(|m| m.key.starts_with("lora_te_")) {
            return Err(wrong(format!("a LoRA for Stable Diffusion 1.x / 2.x (one text encoder: {}); SDXL LoRAs name lora_te1_ / lora_te2_", m.key)));
        }
        let underscored: BTreeMap<&str, HashMap<String, &str>> = model.layers.iter().map(|(c, layers)| (*c, layers.keys().map(|n| (n.replace('.', "_"), n.as_str())).collect())).collect();
        let (mut targets, mut unmatched) = (Vec::new(), Vec::new());
        for (i, module) in self.modules.iter().enumerate() {
            let Some((component, layer)) = self.layer_of(module, model, &underscored).map_err(wrong)? else {
                unmatched.push(module.key.clone());
                continue;
            };
            let shape = &model.layers[component][&layer];
            let rank = self.check_shapes(module, &layer, shape).map_err(wrong)?;
            targets.push(Target { module: i, component, layer, rank });
        }
        if !unmatched.is_empty() {
            return Err(wrong(format!("{} of its {} modules adapt no layer of this SDXL model, e.g. {:?}", unmatched.len(), self.modules.len(), sample(&unmatched))));
        }
        Ok(targets)
    }

    /// The component and layer `module` names (None: none of `model`).
    fn layer_of(&self, module: &Module, model: &Adaptable, underscored: &BTreeMap<&str, HashMap<String, &str>>) -> std::result::Result<Option<(&'static str, String)>, String> {
        let key = module.key.as_str();
        // Text encoders' modules may lack the `text_model.` prefix (peft on transformers 5's CLIP).
        let find = |component: &'static str, name: &str| -> Option<(&'static str, String)> {
            let layers = model.layers.get(component)?;
            let names = [name.to_string(), format!("text_model.{name}")];
            let found = names.iter().find(|n| layers.contains_key(*n)).cloned();
            let found = found.or_else(|| names.iter().find_map(|n| underscored.get(component)?.get(&n.replace('.', "_")).map(|n| n.to_string())));
            found.map(|n| (component, n))
        };
        for (prefix, component) in [("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")] {
            if let Some(rest) = key.strip_prefix(prefix) {
                let sgm = match component {
                    "unet" => sgm_unet_module(rest, &model.layout)?,
                    _ => None,
                };
                return Ok(find(component, sgm.as_deref().unwrap_or(rest)));
            }
        }
        for component in COMPONENTS {
            if let Some(rest) = key.strip_prefix(component).and_then(|r| r.strip_prefix('.')) {
                let name = PROCESSOR.iter().find_map(|(suffix, layer)| rest.strip_suffix(suffix).map(|r| format!("{r}{layer}"))).unwrap_or_else(|| rest.to_string());
                return Ok(find(component, &name));
            }
        }
        Ok(None)
    }

    /// The module's rank, checking A [rank, in, (k, k)] and B [out, rank, (1, 1)] against the
    /// layer's weight [out, in, (k, k)].
    fn check_shapes(&self, module: &Module, layer: &str, weight: &[usize]) -> std::result::Result<usize, String> {
        let shape = |name: &Option<String>| self.tensors.info(name.as_deref().unwrap_or_default()).map(|i| i.shape.clone()).unwrap_or_default();
        let (down, up) = (shape(&module.down), shape(&module.up));
        let kernel = &weight[2.min(weight.len())..];
        let fits = match (&down[..], &up[..]) {
            (&[rank, cols, ref dk @ ..], &[out, up_rank, ref uk @ ..]) => {
                let kernel_fits = dk == kernel || (dk.iter().all(|&d| d == 1) && kernel.iter().all(|&d| d == 1));
                (rank > 0 && rank == up_rank && out == weight[0] && cols == weight[1] && kernel_fits && uk.iter().all(|&d| d == 1)).then_some(rank)
            }
            _ => None,
        };
        fits.ok_or_else(|| format!("{} has A {down:?} and B {up:?}, but this model's {layer} weight is {weight:?}: a LoRA for another model", module.key))
    }

    /// A target's factors, read to the CPU.
    pub async fn factors(&self, target: &Target) -> Result<Factors> {
        let module = &self.modules[target.module];
        let read = |name: &Option<String>| {
            let name = name.clone().unwrap_or_default();
            async move {
                let shape = self.tensors.shape(&name)?.to_vec();
                let values = host_f32(&self.tensors, &name, &shape).await?;
                match values.iter().all(|v| v.is_finite()) {
                    true => Ok(values),
                    false => Err(Error::Tensor { path: self.location(), tensor: name, message: "holds non-finite values".into() }),
                }
            }
        };
        let (down, up) = (read(&module.down).await?, read(&module.up).await?);
        let rank = target.rank as f32;
        let scale = match &module.alpha {
            Some(name) => match read(&module.alpha).await?[..] {
                [alpha] => alpha / rank,
                ref values => return Err(Error::Tensor { path: self.location(), tensor: name.clone(), message: format!("alpha has {} values, not one", values.len()) }),
            },
            None => self.peft_scale(module, target),
        };
        Ok(Factors { down, up, scale })
    }

    /// A peft module's alpha / rank (alpha / √rank with rsLoRA) from the file's metadata; 1 without.
    fn peft_scale(&self, module: &Module, target: &Target) -> f32 {
        let Some(config) = self.peft.get(target.component) else { return 1.0 };
        let pattern = config.alpha_pattern.iter().find(|(suffix, _)| module.key == *suffix || module.key.ends_with(&format!(".{suffix}")));
        let rank = target.rank as f32;
        let alpha = pattern.map(|(_, a)| *a).or(config.lora_alpha).unwrap_or(rank);
        match config.use_rslora {
            true => alpha / rank.sqrt(),
            false => alpha / rank,
        }
    }
}

/// peft's configs per component, as diffusers' `save_lora_weights` records them in the file's
/// metadata (`lora_adapter_metadata`: `{"unet.lora_alpha": 8, "unet.use_rslora": false, ...}`).
fn peft_configs(metadata: &BTreeMap<String, String>) -> BTreeMap<String, PeftConfig> {
    let Some(serde_json::Value::Object(entries)) = metadata.get("lora_adapter_metadata").and_then(|m| serde_json::from_str(m).ok()) else {
        return BTreeMap::new();
    };
    let mut configs: BTreeMap<String, PeftConfig> = BTreeMap::new();
    for (key, value) in &entries {
        let Some((component, field)) = key.rsplit_once('.') else { continue };
        let config = configs.entry(component.to_string()).or_default();
        match field {
            "lora_alpha" => config.lora_alpha = value.as_f64().map(|a| a as f32),
            "use_rslora" => config.use_rslora = value.as_bool().unwrap_or(false),
            "alpha_pattern" => {
                let patterns = value.as_object().into_iter().flatten();
                config.alpha_pattern = patterns.filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect();
            }
            _ => {}
        }
    }
    configs
}

fn sample(names: &[String]) -> Vec<&str> {
    names.iter().take(5).map(String::as_str).collect()
}
