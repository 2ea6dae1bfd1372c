#!/usr/bin/env python3
"""Helper of tests/bench_peer.sh (our `sdxl generate` against stable-diffusion.cpp's Vulkan backend).
Needs only numpy (the peer's venv has it); runs under that venv's Python.

    bench_peer_helper.py check  --config DIR --against FILE.safetensors
        The SGM layout written here, computed for DIR's configs, must equal FILE's tensor names
        and shapes (run on the committed tiny fixture: proves the full-size layout is the layout
        of sd_xl_base_1.0.safetensors, which both engines read).
    bench_peer_helper.py model  --config DIR --out FILE.safetensors [--seed 0]
        Writes a random-weight SDXL base (DIR's configs: crate/configs/sdxl-base is the real one)
        as ONE f16 single file in the original SGM layout, streaming: one tensor in memory at a time.
    bench_peer_helper.py run    --log LOG --out JSON -- COMMAND...
        Runs COMMAND, writing each line it prints (stdout and stderr; '\\r' ends a line too) to LOG
        as "WALL<TAB>CPU<TAB>TEXT" (seconds since the start; the process's CPU seconds then); polls
        /proc/PID/io to find when the process last read a lot (the end of its weight load);
        writes wall and CPU time, exit code, peak RSS (ru_maxrss) and the load average to JSON.
        Exits with COMMAND's status (128 + N when signal N killed it).
    bench_peer_helper.py report --ours-gen P --ours-enc P --peer P [--peer-failed P...] --settings JSON
        Turns the runs (P: the prefix of a LOG and its .json) into the one JSON object the bench
        prints (see derive_ours / derive_peer for how each figure is obtained).
"""

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import threading
import time

# --------------------------------------------------------------------------------------------
# The SGM (original Stability) layout of an SDXL base, from diffusers configs
# --------------------------------------------------------------------------------------------

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."


def load_config(root, component):
    with open(os.path.join(root, component, "config.json")) as f:
        return json.load(f)


def per_level(value, n):
    return list(value) if isinstance(value, list) else [value] * n


def linear(name, out, inp, bias=True):
    yield name + ".weight", [out, inp]
    if bias:
        yield name + ".bias", [out]


def norm(name, c):
    yield name + ".weight", [c]
    yield name + ".bias", [c]


def conv(name, out, inp, k):
    yield name + ".weight", [out, inp, k, k]
    yield name + ".bias", [out]


def unet_resnet(p, cin, cout, emb):
    yield from norm(p + "in_layers.0", cin)
    yield from conv(p + "in_layers.2", cout, cin, 3)
    yield from linear(p + "emb_layers.1", cout, emb)
    yield from norm(p + "out_layers.0", cout)
    yield from conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        yield from conv(p + "skip_connection", cout, cin, 1)


def unet_transformer(p, c, depth, context):
    """SpatialTransformer with linear projections (use_linear_projection: true, as SDXL)."""
    yield from norm(p + "norm", c)
    yield from linear(p + "proj_in", c, c)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1", c), ("attn2", context)):
            yield from linear(f"{b}{attn}.to_q", c, c, bias=False)
            yield from linear(f"{b}{attn}.to_k", c, kv, bias=False)
            yield from linear(f"{b}{attn}.to_v", c, kv, bias=False)
            yield from linear(f"{b}{attn}.to_out.0", c, c)
        yield from linear(b + "ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate, 4c each
        yield from linear(b + "ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            yield from norm(b + n, c)
    yield from linear(p + "proj_out", c, c)


def unet_tensors(cfg):
    chans = cfg["block_out_channels"]
    n = len(chans)
    layers = per_level(cfg["layers_per_block"], n)
    depth = per_level(cfg.get("transformer_layers_per_block", 1), n)
    context = cfg["cross_attention_dim"]
    emb = 4 * chans[0]
    p = UNET
    yield from linear(p + "time_embed.0", emb, chans[0])
    yield from linear(p + "time_embed.2", emb, emb)
    yield from linear(p + "label_emb.0.0", emb, cfg["projection_class_embeddings_input_dim"])
    yield from linear(p + "label_emb.0.2", emb, emb)
    yield from conv(p + "input_blocks.0.0", chans[0], cfg["in_channels"], 3)
    skips, ch, block = [chans[0]], chans[0], 1
    for b, kind in enumerate(cfg["down_block_types"]):
        for _ in range(layers[b]):
            yield from unet_resnet(f"{p}input_blocks.{block}.0.", ch, chans[b], emb)
            ch = chans[b]
            if kind.startswith("CrossAttn"):
                yield from unet_transformer(f"{p}input_blocks.{block}.1.", ch, depth[b], context)
            skips.append(ch)
            block += 1
        if b < n - 1:
            yield from conv(f"{p}input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    yield from unet_resnet(p + "middle_block.0.", ch, ch, emb)
    yield from unet_transformer(p + "middle_block.1.", ch, depth[-1], context)
    yield from unet_resnet(p + "middle_block.2.", ch, ch, emb)
    block = 0
    for u, kind in enumerate(cfg["up_block_types"]):
        r = n - 1 - u
        attention = kind.startswith("CrossAttn")
        for j in range(layers[r] + 1):
            yield from unet_resnet(f"{p}output_blocks.{block}.0.", ch + skips.pop(), chans[r], emb)
            ch = chans[r]
            if attention:
                yield from unet_transformer(f"{p}output_blocks.{block}.1.", ch, depth[r], context)
            if j == layers[r] and u < n - 1:
                yield from conv(f"{p}output_blocks.{block}.{2 if attention else 1}.conv", ch, ch, 3)
            block += 1
    yield from norm(p + "out.0", chans[0])
    yield from conv(p + "out.2", cfg["out_channels"], chans[0], 3)


def vae_resnet(p, cin, cout):
    yield from norm(p + "norm1", cin)
    yield from conv(p + "conv1", cout, cin, 3)
    yield from norm(p + "norm2", cout)
    yield from conv(p + "conv2", cout, cout, 3)
    if cin != cout:
        yield from conv(p + "nin_shortcut", cout, cin, 1)


def vae_mid(p, c):
    yield from vae_resnet(p + "mid.block_1.", c, c)
    yield from norm(p + "mid.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        yield from conv(f"{p}mid.attn_1.{proj}", c, c, 1)  # LDM stores the projections as 1x1 convs
    yield from vae_resnet(p + "mid.block_2.", c, c)


def vae_tensors(cfg):
    chans, lat = cfg["block_out_channels"], cfg["latent_channels"]
    n, layers = len(chans), cfg["layers_per_block"]
    e, d = VAE + "encoder.", VAE + "decoder."
    yield from conv(e + "conv_in", chans[0], cfg["in_channels"], 3)
    ch = chans[0]
    for i in range(n):
        for j in range(layers):
            yield from vae_resnet(f"{e}down.{i}.block.{j}.", ch, chans[i])
            ch = chans[i]
        if i < n - 1:
            yield from conv(f"{e}down.{i}.downsample.conv", ch, ch, 3)
    yield from vae_mid(e, ch)
    yield from norm(e + "norm_out", ch)
    yield from conv(e + "conv_out", 2 * lat, ch, 3)
    yield from conv(VAE + "quant_conv", 2 * lat, 2 * lat, 1)
    yield from conv(VAE + "post_quant_conv", lat, lat, 1)
    ch = chans[-1]
    yield from conv(d + "conv_in", ch, lat, 3)
    yield from vae_mid(d, ch)
    for i in reversed(range(n)):
        for j in range(layers + 1):
            yield from vae_resnet(f"{d}up.{i}.block.{j}.", ch, chans[i])
            ch = chans[i]
        if i > 0:
            yield from conv(f"{d}up.{i}.upsample.conv", ch, ch, 3)
    yield from norm(d + "norm_out", ch)
    yield from conv(d + "conv_out", cfg["out_channels"], ch, 3)


def clip_l_tensors(cfg):
    h, inter, p = cfg["hidden_size"], cfg["intermediate_size"], CLIP_L
    yield p + "embeddings.token_embedding.weight", [cfg["vocab_size"], h]
    yield p + "embeddings.position_embedding.weight", [cfg["max_position_embeddings"], h]
    yield p + "embeddings.position_ids", [1, cfg["max_position_embeddings"]]
    for k in range(cfg["num_hidden_layers"]):
        b = f"{p}encoder.layers.{k}."
        for proj in "qkv":
            yield from linear(f"{b}self_attn.{proj}_proj", h, h)
        yield from linear(b + "self_attn.out_proj", h, h)
        yield from norm(b + "layer_norm1", h)
        yield from norm(b + "layer_norm2", h)
        yield from linear(b + "mlp.fc1", inter, h)
        yield from linear(b + "mlp.fc2", h, inter)
    yield from norm(p + "final_layer_norm", h)


def clip_g_tensors(cfg):
    """OpenCLIP's text tower: fused q/k/v (in_proj), text_projection stored [hidden, projection]."""
    h, inter, p = cfg["hidden_size"], cfg["intermediate_size"], CLIP_G
    yield p + "positional_embedding", [cfg["max_position_embeddings"], h]
    yield p + "token_embedding.weight", [cfg["vocab_size"], h]
    yield from norm(p + "ln_final", h)
    yield p + "text_projection", [h, cfg["projection_dim"]]
    yield p + "logit_scale", []
    for k in range(cfg["num_hidden_layers"]):
        b = f"{p}transformer.resblocks.{k}."
        yield b + "attn.in_proj_weight", [3 * h, h]
        yield b + "attn.in_proj_bias", [3 * h]
        yield from linear(b + "attn.out_proj", h, h)
        yield from norm(b + "ln_1", h)
        yield from norm(b + "ln_2", h)
        yield from linear(b + "mlp.c_fc", inter, h)
        yield from linear(b + "mlp.c_proj", h, inter)


def sgm_layout(config_dir):
    """[(name, shape)] of an SDXL base single file, sorted by name."""
    tensors = list(unet_tensors(load_config(config_dir, "unet")))
    tensors += vae_tensors(load_config(config_dir, "vae"))
    tensors += clip_l_tensors(load_config(config_dir, "text_encoder"))
    tensors += clip_g_tensors(load_config(config_dir, "text_encoder_2"))
    names = [n for n, _ in tensors]
    assert len(names) == len(set(names)), "duplicate tensor names"
    return sorted(tensors)


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def cmd_check(args):
    ours = {n: s for n, s in sgm_layout(args.config)}
    theirs = {n: v["shape"] for n, v in read_header(args.against).items()}
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    shapes = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
    for label, names in (("missing", missing), ("extra", extra), ("shape differs", shapes)):
        for n in names[:20]:
            print(f"{label}: {n} ours {ours.get(n)} file {theirs.get(n)}", file=sys.stderr)
    if missing or extra or shapes:
        sys.exit(f"layout differs from {args.against}: {len(missing)} missing, {len(extra)} extra, {len(shapes)} shapes")
    print(f"layout of {args.config} matches {args.against}: {len(ours)} tensors")


# --------------------------------------------------------------------------------------------
# Random weights, streamed into one safetensors file
# --------------------------------------------------------------------------------------------


def random_tensor(rng, np, name, shape):
    """Values like a trained-ish init, so no engine meets NaN/inf or all-zero shortcuts: weights
    N(0, 1/fan_in) (activations keep unit scale through every layer), norm scales 1 +- 0.02,
    biases and embeddings N(0, 0.02)."""
    count = int(np.prod(shape)) if shape else 1
    if name.endswith("position_ids"):
        return np.arange(count, dtype=np.int64)
    if name.endswith("logit_scale"):
        return np.full(count, 4.6052, dtype=np.float16)  # ln(100), OpenCLIP's trained value
    base = name.rsplit(".", 1)[-1]
    is_norm = re.search(r"(?:^|\.)(?:norm[123]?|layer_norm[12]|final_layer_norm|ln_[12]|ln_final|norm_out"
                        r"|in_layers\.0|out_layers\.0|out\.0)\.weight$", name)
    values = rng.standard_normal(count, dtype=np.float32)
    if is_norm:
        values *= 0.02
        values += 1.0
    elif base == "bias" or base.endswith("_bias") or "embedding" in name:
        values *= 0.02
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        values *= 1.0 / np.sqrt(fan_in)
    return values.astype(np.float16)


def cmd_model(args):
    import numpy as np

    layout = sgm_layout(args.config)
    header, offset = {}, 0
    for name, shape in layout:
        dtype, size = ("I64", 8) if name.endswith("position_ids") else ("F16", 2)
        nbytes = size * (int(np.prod(shape)) if shape else 1)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "note": f"random weights (seed {args.seed}) by tests/bench_peer_helper.py"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    rng = np.random.default_rng(args.seed)
    partial = args.out + ".partial"  # renamed at the end: a cached file is always complete
    params = 0
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape) in enumerate(layout):
            data = random_tensor(rng, np, name, shape)
            assert data.nbytes == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(data.tobytes())
            params += data.size
            if i % 200 == 0:
                print(f"  {i}/{len(layout)} tensors, {f.tell() / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    os.replace(partial, args.out)
    print(f"wrote {args.out}: {len(layout)} tensors, {params:,} values, {os.path.getsize(args.out) / 2**30:.2f} GiB", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid):
    """User + system CPU time of all of a process's threads so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cmd_run(args):
    import resource

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    log = open(args.log, "w")

    def pump():
        # Lines end at '\n' or '\r' (progress bars rewrite one line). Each is stamped with the
        # arrival of its FIRST byte (a progress report printed without a line end is only ended
        # by the next one, one step later), and with the process's CPU seconds at that moment:
        # on a shared machine wall time depends on what else runs, CPU time much less.
        pending, since = b"", (0.0, 0.0)
        while True:
            chunk = proc.stdout.read(65536)
            if not chunk:
                break
            now = (time.monotonic() - start, cpu_seconds(proc.pid))
            if not pending:
                since = now
            pending += chunk
            parts = re.split(rb"[\r\n]", pending)
            pending = parts.pop()
            for i, part in enumerate(parts):
                stamp = since if i == 0 else now
                if part.strip():
                    write(stamp, part)
            if parts:  # what is left began in this chunk
                since = now
        if pending.strip():
            write(since, pending)

    def write(stamp, part):
        wall, cpu = stamp
        text = part.decode(errors="replace")
        log.write(f"{wall:.3f}\t{'-' if cpu is None else f'{cpu:.2f}'}\t{text}\n")
        log.flush()
        if args.echo:
            print(f"  [{wall:7.1f}s] {text}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    # The end of the weight load: the last moment the process's read counter (rchar: bytes read
    # through read(2), page cache or not) grew by more than 1 MiB between two polls 0.1 s apart.
    # Our engine reads every tensor with read(2) and nothing big after loading, so this is when
    # its last tensor was read (what it then does with that one tensor follows within ms).
    last_rchar, reads_end, reads_end_cpu, rchar = 0, None, None, 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/io") as f:
                rchar = int(next(line for line in f if line.startswith("rchar:")).split()[1])
        except (OSError, StopIteration, ValueError):
            pass
        if rchar - last_rchar > 1 << 20:
            reads_end, reads_end_cpu = time.monotonic() - start, cpu_seconds(proc.pid)
        last_rchar = rchar
        time.sleep(0.1)
    wall = time.monotonic() - start
    reader.join()
    log.close()
    # proc.poll() reaped it, so its rusage is counted in our children's (the only child this
    # process ever waits for is COMMAND): ru_maxrss is its peak RSS (KiB), plus CPU seconds.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"command": command, "exit_code": proc.returncode, "wall_s": round(wall, 3),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "reads_end_s": reads_end and round(reads_end, 3), "reads_end_cpu_s": reads_end_cpu,
              "bytes_read": rchar, "loadavg_1min": [load_before, os.getloadavg()[0]]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    # As a shell reports it: 128 + N for a process killed by signal N.
    sys.exit(128 - proc.returncode if proc.returncode < 0 else proc.returncode)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


class Run:
    """A finished run: its JSON and its stamped lines [(wall, cpu, text)]. A line whose CPU time
    could not be read (printed as the process exited) gets the process's total."""

    def __init__(self, prefix):
        with open(prefix + ".json") as f:
            self.info = json.load(f)
        self.lines = []
        with open(prefix + ".log") as f:
            for line in f:
                wall, cpu, text = line.rstrip("\n").split("\t", 2)
                self.lines.append((float(wall), self.info["cpu_s"] if cpu == "-" else float(cpu), text))

    def find(self, pattern, after=None):
        """(wall, cpu, match) of the first line matching pattern (at or after the stamp
        `after`), else None."""
        for wall, cpu, text in self.lines:
            m = re.search(pattern, text)
            if m and (after is None or wall >= after[0]):
                return wall, cpu, m
        return None

    def reads_end(self):
        """(wall, cpu) when the weight reads ended (see cmd_run), else None."""
        if self.info["reads_end_s"] is None:
            return None
        return self.info["reads_end_s"], self.info["reads_end_cpu_s"]


def span(a, b):
    """(wall, cpu) from event a to event b; None where either is missing."""
    if a is None or b is None:
        return None
    return b[0] - a[0], b[1] - a[1]


def minus(a, b):
    return None if a is None or b is None else (a[0] - b[0], a[1] - b[1])


def phases(figures):
    """{name: (wall, cpu) | [(wall, cpu)] | None} -> wall seconds at the top level (the figures
    asked for) and the same in CPU seconds (all threads) under "cpu_s" ("total" for the run)."""
    def pick(value, i):
        if value is None:
            return None
        if isinstance(value, list):
            return [round(v[i], 3) for v in value]
        return round(value[i], 3)

    out = {f"{k}_s": pick(v, 0) for k, v in figures.items()}
    out["cpu_s"] = {("total" if k == "wall" else k): pick(v, 1) for k, v in figures.items()}
    return out


def median_of(pairs):
    if not pairs:
        return None
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def derive_ours(gen_prefix, enc_prefix):
    """Our CLI prints "adapter: ..." after device init, "PATH: FORMAT" as the load starts,
    "base step k/N" after step k's GPU work has finished (it syncs before reporting), and
    "wrote OUT" once the PNG is written. So, from the line stamps:
      load        = start of the process -> the end of its weight reads (device init included;
                    device_init_s separately)
      steady step = median of the gaps between consecutive "base step" lines (exact)
      vae         = last "base step" line -> "wrote" (decode, read back, PNG encode + write)
      text encoder: not synchronised on its own inside generate, so it is timed by a second run,
                    `sdxl encode` of the same prompt on the same file (it loads only the text
                    encoders): its "wrote" line minus the end of its weight reads
      first step  = first "base step" line - end of weight reads - text encoder
    """
    gen, enc = Run(gen_prefix), Run(enc_prefix)
    adapter = gen.find(r"^adapter: (.*)")
    steps = [(w, c) for w, c, text in gen.lines if re.match(r"base step \d+/\d+", text)]
    wrote, enc_wrote = gen.find(r"^wrote "), enc.find(r"^wrote ")
    load_end = gen.reads_end()
    text_encoder = span(enc.reads_end(), enc_wrote and enc_wrote[:2])
    first_step = minus(span(load_end, steps[0] if steps else None), text_encoder)
    gaps = [span(a, b) for a, b in zip(steps, steps[1:])]
    figures = {
        "device_init": adapter and adapter[:2],
        "load": load_end,
        "text_encoder": text_encoder,
        "unet_first_step": first_step,
        "unet_steady_step": median_of(gaps),
        "unet_steps": ([first_step] if first_step else []) + gaps,
        "vae": span(steps[-1] if steps else None, wrote and wrote[:2]),
        "wall": (gen.info["wall_s"], gen.info["cpu_s"]),
    }
    return {
        "engine": "sdxl (this repository), `sdxl generate`",
        "exit_code": gen.info["exit_code"],
        "adapter": adapter[2].group(1) if adapter else None,
        **phases(figures),
        "peak_rss_mib": gen.info["peak_rss_mib"],
        "loadavg_1min": gen.info["loadavg_1min"],
        "text_encoder_run": {k: enc.info[k] for k in ("exit_code", "wall_s", "cpu_s", "reads_end_s", "peak_rss_mib", "loadavg_1min")},
    }


def derive_peer(prefix):
    """stable-diffusion.cpp (--verbose; cyllama's --progress prints a callback per step) is timed
    at the same boundaries as ours, from the line stamps:
      load        = start of the process -> cyllama's "Model loaded in" line (Python start,
                    Vulkan init and the weight load, as ours: start -> model ready)
      text encoder = cyllama's "Generating" line -> sd.cpp's "get_learned_condition completed"
      steps       = "Step 0/N" (sampling starts) -> "Step 1/N" -> "Step 2/N" ... (the progress
                    callback after each step)
      vae         = last step -> "decode_first_stage completed"
    sd.cpp's own figures (its timers around each phase) are kept under "reported"."""
    run = Run(prefix)

    def taking(pattern):
        hit = run.find(pattern + r".*?taking ([0-9.]+)\s*(ms|s)\b")
        return None if hit is None else round(float(hit[2].group(1)) / (1000 if hit[2].group(2) == "ms" else 1), 3)

    loaded = run.find(r"Model loaded in ([0-9.]+)s")
    generating = run.find(r"^Generating \d+ image")
    cond = run.find(r"get_learned_condition completed")
    # The same progress callback also counts tensors while loading: sampling steps are the
    # reports after the text conditioning. A step reported twice keeps its first stamp.
    steps, own = {}, {}
    for wall, cpu, text in run.lines:
        if cond and wall >= cond[0]:
            for m in re.finditer(r"Step (\d+)/(\d+) \([0-9.]+%\) - ([0-9.]+)s", text):
                steps.setdefault(int(m.group(1)), (wall, cpu))
                own[int(m.group(1))] = float(m.group(3))
    # "Step 0/N" comes when sampling starts (after the initial noise): the first step's start.
    start = steps.pop(0, cond and cond[:2])
    steps = [steps[k] for k in sorted(steps)]
    decoded = run.find(r"decode_first_stage completed")
    events = ([start] if start else []) + steps
    step_spans = [span(a, b) for a, b in zip(events, events[1:])]
    device = run.find(r"ggml_vulkan: 0 = (.*)")
    backend = run.find(r"Initializing backend: (\S+)")
    figures = {
        "load": loaded and loaded[:2],
        "text_encoder": span(generating and generating[:2], cond and cond[:2]),
        "unet_first_step": step_spans[0] if step_spans else None,
        "unet_steady_step": median_of(step_spans[1:]),
        "unet_steps": step_spans,
        "vae": span(steps[-1] if steps else None, decoded and decoded[:2]),
        "wall": (run.info["wall_s"], run.info["cpu_s"]),
    }
    return {
        "engine": "stable-diffusion.cpp (PyPI cyllama-vulkan 0.2.18, ggml Vulkan backend)",
        "exit_code": run.info["exit_code"],
        "adapter": device[2].group(1) if device else None,
        "backend": backend[2].group(1) if backend else None,
        **phases(figures),
        "peak_rss_mib": run.info["peak_rss_mib"],
        "loadavg_1min": run.info["loadavg_1min"],
        "reported": {
            "model_loaded_s": float(loaded[2].group(1)) if loaded else None,
            "loading_tensors_s": taking(r"loading tensors completed"),
            "get_learned_condition_s": taking(r"get_learned_condition completed"),
            # its progress callback's figure: the mean time per step so far, not each step's own
            "mean_step_s_so_far": [own[k] for k in sorted(own) if k > 0],
            "sampling_s": taking(r"sampling completed"),
            "decode_first_stage_s": taking(r"decode_first_stage completed"),
            "generate_image_s": (lambda h: h and float(h[2].group(1)))(run.find(r"generate_image completed in ([0-9.]+)s")),
        },
    }


def failed_attempt(prefix):
    run = Run(prefix)
    code = run.info["exit_code"]
    return {"exit_code": code, "signal": -code if code < 0 else None, "wall_s": run.info["wall_s"],
            "last_line": run.lines[-1][2][:200] if run.lines else None, "log": prefix + ".log"}


def cmd_report(args):
    with open(args.settings) as f:
        settings = json.load(f)
    peer = derive_peer(args.peer)
    peer["failed_attempts"] = [failed_attempt(p) for p in args.peer_failed]
    report = {"benchmark": "tests/bench_peer.sh", "settings": settings,
              "ours": derive_ours(args.ours_gen, args.ours_enc), "peer": peer}
    print(json.dumps(report, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check")
    p.add_argument("--config", required=True)
    p.add_argument("--against", required=True)
    p = sub.add_parser("model")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run")
    p.add_argument("--log", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--echo", action="store_true", help="also print each stamped line to stderr")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("report")
    p.add_argument("--ours-gen", required=True)
    p.add_argument("--ours-enc", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--peer-failed", nargs="*", default=[], help="runs of the peer that crashed (retried)")
    p.add_argument("--settings", required=True)
    args = parser.parse_args()
    {"check": cmd_check, "model": cmd_model, "run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
