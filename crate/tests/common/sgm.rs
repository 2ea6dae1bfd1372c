//! Stability's SGM names of diffusers' tensors (the inverse of diffusers' single-file conversion),
//! for tests that write or read single-file checkpoints of SDXL-shaped models.

/// SGM's name of a diffusers UNet tensor (the inverse of diffusers' convert_ldm_unet_checkpoint),
/// for levels of `layers` resnets, `attention` marking the up levels with transformers.
pub fn sgm_unet(name: &str, layers: &[usize], up_attention: &[bool]) -> String {
    const RESNET: [(&str, &str); 6] =
        [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")];
    let resnet = |rest: &str| RESNET.iter().find_map(|(d, s)| rest.strip_prefix(d).map(|p| format!("{s}{p}"))).unwrap();
    const FIXED: [(&str, &str); 7] = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    if let Some(n) = FIXED.iter().find_map(|(d, s)| name.strip_prefix(d).map(|p| format!("{s}{p}"))) {
        return format!("model.diffusion_model.{n}");
    }
    let parts: Vec<&str> = name.splitn(5, '.').collect();
    let sgm = match parts.as_slice() {
        ["mid_block", "resnets", k, rest @ ..] => format!("middle_block.{}.{}", 2 * k.parse::<usize>().unwrap(), resnet(&rest.join("."))),
        ["mid_block", "attentions", "0", rest @ ..] => format!("middle_block.1.{}", rest.join(".")),
        [side @ ("down_blocks" | "up_blocks"), level, kind, j, rest] => {
            let (l, j): (usize, usize) = (level.parse().unwrap(), j.parse().unwrap());
            let n = layers.len();
            if *side == "down_blocks" {
                let first = 1 + (0..l).map(|i| layers[i] + 1).sum::<usize>();
                match *kind {
                    "resnets" => format!("input_blocks.{}.0.{}", first + j, resnet(rest)),
                    "attentions" => format!("input_blocks.{}.1.{rest}", first + j),
                    _ => format!("input_blocks.{}.0.op.{}", first + layers[l], rest.strip_prefix("conv.").unwrap()),
                }
            } else {
                let first = (0..l).map(|i| layers[n - 1 - i] + 1).sum::<usize>();
                let last = first + layers[n - 1 - l];
                match *kind {
                    "resnets" => format!("output_blocks.{}.0.{}", first + j, resnet(rest)),
                    "attentions" => format!("output_blocks.{}.1.{rest}", first + j),
                    _ => format!("output_blocks.{last}.{}.{rest}", if up_attention[l] { 2 } else { 1 }),
                }
            }
        }
        _ => panic!("unexpected UNet tensor {name}"),
    };
    format!("model.diffusion_model.{sgm}")
}

/// SGM's name and shape of a diffusers AutoencoderKL tensor (1x1-conv attention projections).
pub fn sgm_vae(name: &str, shape: &[usize], levels: usize) -> (String, Vec<usize>) {
    const ATTENTION: [(&str, &str); 5] = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")];
    let resnet = |rest: &str| rest.replace("conv_shortcut.", "nin_shortcut.");
    let parts: Vec<&str> = name.splitn(5, '.').collect();
    let (sgm, shape) = match parts.as_slice() {
        [side, "down_blocks", i, "resnets", rest] => (format!("{side}.down.{i}.block.{}", resnet(rest)), shape.to_vec()),
        [side, "down_blocks", i, "downsamplers", rest] => (format!("{side}.down.{i}.downsample.{}", rest.strip_prefix("0.").unwrap()), shape.to_vec()),
        [side, "up_blocks", i, "resnets", rest] => (format!("{side}.up.{}.block.{}", levels - 1 - i.parse::<usize>().unwrap(), resnet(rest)), shape.to_vec()),
        [side, "up_blocks", i, "upsamplers", rest] => (format!("{side}.up.{}.upsample.{}", levels - 1 - i.parse::<usize>().unwrap(), rest.strip_prefix("0.").unwrap()), shape.to_vec()),
        [side, "mid_block", "resnets", k, rest] => (format!("{side}.mid.block_{}.{}", k.parse::<usize>().unwrap() + 1, resnet(rest)), shape.to_vec()),
        [side, "mid_block", "attentions", "0", rest] => {
            let renamed = ATTENTION.iter().find_map(|(d, s)| rest.strip_prefix(d).map(|p| format!("{s}{p}"))).unwrap();
            (format!("{side}.mid.attn_1.{renamed}"), if shape.len() == 2 { [shape, &[1, 1]].concat() } else { shape.to_vec() })
        }
        _ => (name.replace("conv_norm_out.", "norm_out."), shape.to_vec()),
    };
    (format!("first_stage_model.{sgm}"), shape)
}

