//! One error type for the whole engine. Every variant carries the context a person needs to act:
//! which file, which tensor, which shape, which limit.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No usable WebGPU / Vulkan / Metal / DX12 adapter.
    NoAdapter(String),
    /// The adapter exists but cannot grant what the model needs.
    AdapterLimits(String),
    /// The device was lost (driver reset, tab backgrounded, out of memory).
    DeviceLost(String),
    /// A GPU operation failed (validation, out of memory, map failure).
    Gpu(String),
    /// A file could not be read.
    Io { path: String, message: String },
    /// A safetensors file is malformed.
    Safetensors { path: String, message: String },
    /// A GGUF file is malformed.
    Gguf { path: String, message: String },
    /// A file in a format this engine refuses to read (pickle checkpoints).
    Unsupported { path: String, message: String },
    /// A tensor is missing, or its dtype/shape does not match the config.
    Tensor { path: String, tensor: String, message: String },
    /// A file holds another model than SDXL (SD 1.x, SD 3, FLUX, a UNet alone, ...).
    WrongModel { path: String, message: String },
    /// A config.json is missing a field or holds an unsupported value.
    Config { path: String, message: String },
    /// Tokenizer files are missing or malformed.
    Tokenizer { path: String, message: String },
    /// A caller passed a bad parameter (shape, size, option).
    InvalidParameter(String),
    /// An HTTP request failed; `status` is the HTTP status where the server answered.
    Network { url: String, status: Option<u16>, message: String },
    /// Stored or downloaded bytes do not match their checksum.
    Corrupt { path: String, message: String },
    /// The browser's (or the disk's) storage cannot hold what must be written.
    QuotaExceeded(String),
    /// A stored model is missing or was not completely downloaded.
    ModelIncomplete(String),
    /// The caller cancelled the run (an AbortSignal in the browser).
    Cancelled(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter(m) => write!(f, "no GPU adapter: {m}"),
            Error::AdapterLimits(m) => write!(f, "GPU adapter too limited: {m}"),
            Error::DeviceLost(m) => write!(f, "GPU device lost: {m}"),
            Error::Gpu(m) => write!(f, "GPU error: {m}"),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Safetensors { path, message } => write!(f, "{path}: invalid safetensors: {message}"),
            Error::Gguf { path, message } => write!(f, "{path}: invalid GGUF: {message}"),
            Error::Unsupported { path, message } => write!(f, "{path}: {message}"),
            Error::Tensor { path, tensor, message } => write!(f, "{path}: tensor '{tensor}': {message}"),
            Error::WrongModel { path, message } => write!(f, "{path}: {message}"),
            Error::Config { path, message } => write!(f, "{path}: {message}"),
            Error::Tokenizer { path, message } => write!(f, "{path}: tokenizer: {message}"),
            Error::InvalidParameter(m) => write!(f, "invalid parameter: {m}"),
            Error::Network { url, status: Some(s), message } if !message.contains(&s.to_string()) => write!(f, "{url}: HTTP {s}: {message}"),
            Error::Network { url, message, .. } => write!(f, "{url}: {message}"),
            Error::Corrupt { path, message } => write!(f, "{path}: {message}"),
            Error::QuotaExceeded(m) => write!(f, "storage full: {m}"),
            Error::ModelIncomplete(m) => write!(f, "model not available: {m}"),
            Error::Cancelled(m) => write!(f, "cancelled: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// A byte count as messages print it ("12.3 MiB").
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

impl Error {
    /// Stable machine-readable name, used as the JS error `name`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoAdapter(_) => "WebGpuUnavailable",
            Error::AdapterLimits(_) => "AdapterLimits",
            Error::DeviceLost(_) => "DeviceLost",
            Error::Gpu(_) => "GpuError",
            Error::Io { .. } => "IoError",
            Error::Safetensors { .. } | Error::Gguf { .. } => "CorruptWeights",
            Error::Unsupported { .. } => "UnsupportedFormat",
            Error::Tensor { .. } | Error::WrongModel { .. } => "WrongModel",
            Error::Config { .. } => "BadConfig",
            Error::Tokenizer { .. } => "BadTokenizer",
            Error::InvalidParameter(_) => "InvalidParameter",
            Error::Network { .. } => "NetworkError",
            Error::Corrupt { .. } => "CorruptWeights",
            Error::QuotaExceeded(_) => "QuotaExceeded",
            Error::ModelIncomplete(_) => "ModelIncomplete",
            Error::Cancelled(_) => "AbortError",
        }
    }
}
