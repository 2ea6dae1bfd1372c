//! The app layer's request checks (crate/src/app): what both fronts refuse, and how they name it.

use sdxl::app::{self, de, BenchRequest, Front, GenerateRequest, Input, LoadRequest, Picture};
use sdxl::Error;
use serde_json::json;

fn generate_request(value: serde_json::Value) -> Result<GenerateRequest, Error> {
    de::request(value, "generate")
}

fn message(result: Result<impl Sized, Error>) -> String {
    match result {
        Err(Error::InvalidParameter(m)) => m,
        Err(e) => panic!("expected InvalidParameter, got {e:?}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_options_are_named_with_what_they_must_be() {
    let cases = [
        (json!({"prompt": "x", "steps": "30"}), "steps must be a finite number, not the string \"30\""),
        (json!({"prompt": "x", "width": -64}), "width must be a whole number from 0 to 2^53, not -64"),
        (json!({"prompt": "x", "height": 64.5}), "height must be a whole number from 0 to 2^53, not 64.5"),
        (json!({"prompt": "x", "seed": 9007199254740992u64}), "seed must be a whole number from 0 to 2^53"),
        (json!({"prompt": "x", "guidance": 1e300}), "guidance must be a finite number, not 1e300 (beyond f32)"),
        (json!({"prompt": "x", "scheduler": "euler_b"}), "scheduler must be one of 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_karras', 'ddim', not \"euler_b\""),
        (json!({"prompt": "x", "timestepSpacing": 3}), "timestepSpacing must be one of 'leading', 'trailing', 'linspace', not 3"),
        (json!({"prompt": "x", "outpaint": [1, 2, 3]}), "outpaint must be [left, top, right, bottom] pixel counts, not [1,2,3]"),
        (json!({"prompt": "x", "outpaint": [1, 2, 3, -4]}), "outpaint must be [left, top, right, bottom] pixel counts"),
        (json!({"prompt": "x", "loras": [{"model": "a", "weight": "1"}]}), "loras[0].weight must be a finite number, not the string \"1\""),
        (json!({"prompt": "x", "loras": [{"model": "a"}]}), "loras[0]: missing field `weight`"),
        (json!({"prompt": "x", "finalDecoder": "png"}), "finalDecoder: unknown variant `png`"),
        (json!({"prompt": "x", "seeed": 3}), "generate: unknown option `seeed`"),
        (json!({"steps": 3}), "generate: missing field `prompt`"),
        (json!({"prompt": 7}), "prompt: invalid type: integer `7`, expected a string"),
    ];
    for (value, expected) in cases {
        let got = message(generate_request(value.clone()));
        assert!(got.starts_with(expected), "{value}: {got:?} should start with {expected:?}");
    }
    let quant = message(de::request::<LoadRequest, _>(json!({"base": {"id": "b"}, "quant": "q5"}), "load"));
    assert_eq!(quant, "quant must be one of 'f16', 'q8', 'q4', not \"q5\"");
    let only = message(de::request::<BenchRequest, _>(json!({"only": ["unet", "gpu"]}), "bench"));
    assert!(only.starts_with("only[1]: unknown variant `gpu`"), "{only}");
}

#[test]
fn a_good_request_reads_as_given() {
    let request = generate_request(json!({
        "prompt": "a fox", "width": 96, "height": 64, "steps": 4, "seed": 7, "guidance": 5.5, "scheduler": "dpmpp_2m",
        "refinerStart": null, "loras": [{"model": "style", "weight": -0.5}], "outpaint": [8, 0, 8, 0], "finalDecoder": "taesd"
    }))
    .unwrap();
    assert_eq!((request.width, request.height, request.steps, request.seed, request.guidance), (Some(96), Some(64), Some(4), Some(7), Some(5.5)));
    assert_eq!(request.refiner_start, Some(None), "null is not the same as left out");
    assert_eq!(request.outpaint, Some([8, 0, 8, 0]));
    assert_eq!(request.loras[0].weight, -0.5);
    let defaults = generate_request(json!({"prompt": "x"})).unwrap();
    assert_eq!(defaults.refiner_start, None);
    let prepared = app::prepare(&defaults, None, None, Front::Web, 42).unwrap();
    assert_eq!((prepared.params.width, prepared.params.steps, prepared.params.seed), (1024, 30, 42));
}

/// A 16x8 grey PNG.
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&vec![255u8; (width * height) as usize]).unwrap();
    drop(writer);
    out
}

#[test]
fn options_that_need_others_are_refused_in_each_fronts_words() {
    let request = |value: serde_json::Value| generate_request(value).unwrap();
    let image = || Some(Input { name: "image".into(), picture: Picture::Png(png(16, 8)) });
    let cases: [(GenerateRequest, Option<Input>, Option<Input>, &str, &str); 6] = [
        (request(json!({"prompt": "x", "strength": 0.5})), None, None, "--strength needs --init-image", "strength needs an image"),
        (request(json!({"prompt": "x"})), None, image(), "--mask needs --init-image", "mask needs an image"),
        (request(json!({"prompt": "x", "maskBlur": 2})), image(), None, "--mask-blur needs --mask", "maskBlur needs a mask"),
        (request(json!({"prompt": "x", "maskPadding": 2})), image(), None, "--mask-padding needs --init-image and --mask", "maskPadding needs an image and a mask"),
        (request(json!({"prompt": "x", "outpaint": [8, 0, 0, 0]})), image(), image(), "--outpaint makes its own mask: leave out --mask", "outpaint makes its own mask: leave out mask"),
        (request(json!({"prompt": "x", "outpaintOverlap": 2})), image(), None, "--outpaint-overlap needs --outpaint", "outpaintOverlap needs outpaint"),
    ];
    for (request, image, mask, cli, web) in cases {
        let copy = |p: &Option<Input>| p.as_ref().map(|_| Input { name: "image".into(), picture: Picture::Png(png(16, 8)) });
        assert_eq!(message(app::prepare(&request, copy(&image), copy(&mask), Front::Cli, 0)), cli);
        assert_eq!(message(app::prepare(&request, image, mask, Front::Web, 0)), web);
    }
}

/// What the browser's requests go through: a whole JS value, NaN and Infinity included.
#[test]
fn loose_values_are_checked_whole() {
    use de::Loose::{self, Number, Object, String as Text};
    let request = |entries: Vec<(&str, Loose)>| Object(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let prompt = || ("prompt", Text("x".into()));
    let cases = [
        (request(vec![prompt(), ("steps", Number(f64::NAN))]), "steps must be a finite number, not NaN"),
        (request(vec![prompt(), ("width", Number(f64::INFINITY))]), "width must be a finite number, not Infinity"),
        (request(vec![prompt(), ("seeed", Number(3.0))]), "generate: unknown option `seeed`"),
        (request(vec![prompt(), ("loras", Loose::Array(vec![request(vec![("model", Text("a".into())), ("weight", Number(1.0)), ("w", Number(1.0))])]))]), "loras[0]: unknown option `w`"),
        (request(vec![prompt(), ("finalDecoder", Text("png".into()))]), "finalDecoder: unknown variant `png`"),
    ];
    for (value, expected) in cases {
        let got = message(de::request::<GenerateRequest, _>(value.clone(), "generate"));
        assert!(got.starts_with(expected), "{value:?}: {got:?} should start with {expected:?}");
    }
    let bench = |entries: Vec<(&str, Loose)>| de::request::<BenchRequest, _>(request(entries), "bench");
    let list = |items: Vec<Loose>| Loose::Array(items);
    let ok = bench(vec![("sizes", list(vec![Number(64.0), Number(128.0)])), ("quants", list(vec![Text("q8".into())])), ("loras", list(vec![]))]).unwrap();
    assert_eq!((ok.sizes, ok.quants.map(|q| q.len()), ok.loras), (Some(vec![64, 128]), Some(1), Some(vec![])));
    assert!(message(bench(vec![("sizes", list(vec![Number(64.5)]))])).starts_with("sizes[0] must be a whole number"));
    let good = de::request::<GenerateRequest, _>(request(vec![prompt(), ("steps", Number(4.0)), ("finalDecoder", Text("taesd".into())), ("refinerStart", Loose::Null)]), "generate").unwrap();
    assert_eq!((good.steps, good.final_decoder, good.refiner_start), (Some(4), app::FinalDecoder::Taesd, Some(None)));
}

#[test]
fn store_ids_are_named_as_the_js_api_names_them() {
    use sdxl::quant::QuantPreset;
    assert_eq!(app::store_id("stabilityai/stable-diffusion-xl-base-1.0", QuantPreset::Q4), "stable-diffusion-xl-base-1.0-q4");
    assert_eq!(app::store_id("https://host/models/My Model.gguf?download=1", QuantPreset::Q8), "My-Model.gguf-q8");
    assert_eq!(app::store_id("http://host/..hidden/", QuantPreset::F16), "hidden-f16");
}

#[test]
fn models_without_an_id_are_named_by_the_engine() {
    use sdxl::quant::QuantPreset;
    let spec = |value: serde_json::Value| de::request::<app::ModelSpec, _>(value, "load").unwrap();
    let model = |value| spec(value).resolve(|url| app::store_id(url, QuantPreset::Q4));
    let by_url = model(json!({"url": "https://host/sdxl/"})).unwrap();
    assert_eq!((by_url.id.as_str(), by_url.url.as_deref()), ("sdxl-q4", Some("https://host/sdxl/")));
    assert_eq!(model(json!({"file": "my model.safetensors"})).unwrap().id, "my-model.safetensors-q4");
    assert_eq!(model(json!({"id": "mine", "url": "https://host/sdxl"})).unwrap().id, "mine");
    assert_eq!(model(json!({"id": "stored"})).unwrap(), app::LoadedModel { id: "stored".into(), url: None, file: None });
    assert_eq!(message(model(json!({}))), "a model needs an id, a url or a file");
    assert_eq!(message(model(json!({"id": ""}))), "a model's id is empty");
    // LoRAs and preview decoders: the file's name without .safetensors, as <lora:NAME:W> tags name it.
    assert_eq!(spec(json!({"url": "owner/name/Detail Tweaker.SafeTensors"})).resolve(app::file_id).unwrap().id, "Detail-Tweaker");
    assert_eq!(app::file_id("x/taesdxl.gguf"), "taesdxl.gguf");
    // The preset defaults to q4.
    let load = de::request::<LoadRequest, _>(json!({"base": {"url": "a/b"}}), "load").unwrap();
    assert_eq!(load.quant, QuantPreset::Q4);
}
