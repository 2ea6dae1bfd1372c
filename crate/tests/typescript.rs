//! web/sdxl.d.ts declares the engine's requests, results and events from their Rust types
//! (crate/src/app/types.rs, through tsify): this test fails when the committed declarations
//! differ from them. `SDXL_WRITE_TYPES=1 cargo test --test typescript` rewrites them.

use sdxl::app::*;
use sdxl::bench::{BenchReport, KernelResult, Peak, Skipped, TaesdResult, UnetResult, VaeResult};
use sdxl::pack::ModelKind;
use sdxl::store::{StoredFile, StoredModel};
use sdxl::pipeline::generate::Stage;
use sdxl::quant::QuantPreset;
use sdxl::scheduler::{SamplerChoice, TimestepSpacing};
use strum::VariantNames;
use tsify::Tsify;

const BEGIN: &str = "// <generated> from crate/src/app/types.rs by crate/tests/typescript.rs: edit those, not this.\n";
const END: &str = "// </generated>\n";

/// A union of string literals: a Rust enum's names.
fn names<T: VariantNames>(name: &str) -> String {
    let list: Vec<String> = T::VARIANTS.iter().map(|v| format!("'{v}'")).collect();
    format!("export type {name} = {};", list.join(" | "))
}

fn generated() -> String {
    let decls = [
        names::<QuantPreset>("Quant"),
        names::<SamplerChoice>("Scheduler"),
        names::<TimestepSpacing>("TimestepSpacing"),
        Stage::DECL.into(),
        GenerateRequest::DECL.into(),
        LoraWeight::DECL.into(),
        FinalDecoder::DECL.into(),
        CreateRequest::DECL.into(),
        ModelSpec::DECL.into(),
        LoadedModel::DECL.into(),
        LoadRequest::DECL.into(),
        LoadedModels::DECL.into(),
        BenchPart::DECL.into(),
        BenchRequest::DECL.into(),
        Transfer::DECL.into(),
        StepProgressEvent::DECL.into(),
        EngineEvent::DECL.into(),
        Timings::DECL.into(),
        GenerateOutput::DECL.into(),
        AdapterInfo::DECL.into(),
        ModelKind::DECL.into(),
        StoredModel::DECL.into(),
        StoredFile::DECL.into(),
        Peak::DECL.into(),
        KernelResult::DECL.into(),
        UnetResult::DECL.into(),
        VaeResult::DECL.into(),
        TaesdResult::DECL.into(),
        Skipped::DECL.into(),
        BenchReport::DECL.into(),
    ];
    format!("{BEGIN}{}\n{END}", decls.join("\n\n"))
}

#[test]
fn declarations_match_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../web/sdxl.d.ts");
    let text = std::fs::read_to_string(path).expect("web/sdxl.d.ts");
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else { panic!("web/sdxl.d.ts has no generated section ({BEGIN:?} … {END:?})") };
    let expected = generated();
    let current = &text[begin..end + END.len()];
    if current == expected {
        return;
    }
    if std::env::var_os("SDXL_WRITE_TYPES").is_some() {
        std::fs::write(path, format!("{}{expected}{}", &text[..begin], &text[end + END.len()..])).expect("writing web/sdxl.d.ts");
        return;
    }
    panic!("web/sdxl.d.ts is stale: run SDXL_WRITE_TYPES=1 cargo test --test typescript\n--- expected:\n{expected}");
}
