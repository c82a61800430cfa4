//! The device check's rows of [`super::GpuTrainableEncoder`]: the whole training step in each
//! storage and arithmetic, its attention kernels alone, and its products alone.

use super::{site_slot, t, training_step_flops, GpuTrainableEncoder};
use crate::device::runtime::{alloc, cublas_f32, cuda_err, ptr, F32Blas, GemmMath, Gpu};
use crate::error::{Error, Result};
use crate::model::config::BertConfig;
use crate::model::pooling::Pooling;
use crate::train::encoder_grad::{DropoutPlan, TrainBatch};
use crate::train::rng::Site;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// The device check's rows: one f32 training step (forward + backward, gradients left on the
/// device) of a random BERT-base at the target shape, 64 queries with a positive and 7 hard
/// negatives each, 128 tokens per sequence; then, in the mixed-precision mode (bf16 products
/// and tensor-core attention), where that step's time goes: the forward without and with
/// dropout, the backward (a forward and backward, less the forward), and the forward attention
/// kernels alone (`bench_attention`).
pub fn bench(gpu: &Gpu) -> Result<Vec<crate::device::KernelTiming>> {
    use crate::model::synthetic::{batch_with_lengths, bert_base_config, random_bert};
    let cfg = bert_base_config();
    let bert = random_bert(cfg.clone(), 1);
    let seqs = 64 * 9;
    let batch = batch_with_lengths(&cfg, &vec![128; seqs], 2);
    let tb = TrainBatch {
        example_ids: (0..seqs as u64).collect(),
        packed: batch,
    };
    let mut enc =
        GpuTrainableEncoder::new(gpu, &bert, Pooling::Mean, true, tb.packed.tokens(), seqs)?;
    let d_emb = vec![1e-3f32; seqs * cfg.hidden_size];
    let flops = training_step_flops(&cfg, tb.packed.tokens(), 128);
    let shape = |what: &str| format!("BERT-base, {seqs} x 128 tokens, {what}");
    let row = |name: &str, shape: String, ms: f64, flops: f64| crate::device::KernelTiming {
        name: name.into(),
        shape,
        ms,
        bytes: 0.0,
        flops,
    };
    let step = |enc: &mut GpuTrainableEncoder, dropout: &DropoutPlan| -> Result<()> {
        enc.forward_train(&tb, dropout)?;
        enc.zero_grads()?;
        enc.accumulate_backward(&d_emb)
    };
    let ms = gpu.time_ms(3, || step(&mut enc, &DropoutPlan::none()))?;
    let mut rows = vec![row(
        "encoder training step (f32: cuBLAS + encoder_train/backward/attention kernels)",
        shape("forward + backward"),
        ms,
        flops,
    )];
    let dropout = DropoutPlan {
        hidden: 0.1,
        attention: 0.1,
        seed: 1,
        step: 0,
    };
    // the f32 step's attention kernels alone, on a forward with dropout
    enc.forward_train(&tb, &dropout)?;
    rows.extend(bench_attention(&enc, &cfg, tb.packed.tokens())?);
    enc.set_gemm_math(GemmMath::Bf16)?;
    // the forward's share of the model FLOPs: one of the products' three passes, and one of
    // attention's 3.5
    let forward_flops = {
        let (t, h, i, l) = (
            tb.packed.tokens() as f64,
            cfg.hidden_size as f64,
            cfg.intermediate_size as f64,
            cfg.num_hidden_layers as f64,
        );
        l * (2.0 * t * (4.0 * h * h + 2.0 * h * i) + 4.0 * t * 128.0 * h)
    };
    let plain = gpu.time_ms(3, || enc.forward_train(&tb, &DropoutPlan::none()).map(drop))?;
    rows.push(row(
        "encoder training forward, bf16 activations (products and attention), no dropout",
        shape("forward"),
        plain,
        forward_flops,
    ));
    let dropped = gpu.time_ms(3, || enc.forward_train(&tb, &dropout).map(drop))?;
    rows.push(row(
        "encoder training forward, bf16 activations (products and attention), dropout 0.1",
        shape("forward"),
        dropped,
        forward_flops,
    ));
    let whole = gpu.time_ms(3, || step(&mut enc, &dropout))?;
    rows.push(row(
        "encoder training backward, bf16 activations (products and attention), dropout 0.1 \
         (the step less the forward above)",
        shape("backward"),
        whole - dropped,
        flops - forward_flops,
    ));
    // the backward spent the batch: a forward with dropout leaves one for the kernels alone
    enc.forward_train(&tb, &dropout)?;
    rows.extend(bench_attention(&enc, &cfg, tb.packed.tokens())?);
    Ok(rows)
}

/// The forward attention kernels the training step chooses between, alone, on the batch of the
/// encoder's last forward (it must have had attention dropout), one layer's run times the
/// layers: per step. With f32 activations the tiled SIMT kernel without dropout and the one
/// with dropout; with bf16 activations the tensor-core kernel, without and with it.
fn bench_attention(
    enc: &GpuTrainableEncoder,
    cfg: &BertConfig,
    tokens: usize,
) -> Result<Vec<crate::device::KernelTiming>> {
    let b = enc
        .last
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("bench_attention needs a forward first".into()))?;
    let p = b.dropout.attention;
    let st = &enc.stream;
    let (bias, offs) = (ptr(enc.layer_w(0, t::QKV_B), st), ptr(&enc.offsets, st));
    let slot = site_slot(0, Site::AttentionDropout);
    let max_len = b.max_len();
    let layers = cfg.num_hidden_layers as f64;
    // 4 · Σ len² · h per layer (S and P·V)
    let flops = layers * 4.0 * tokens as f64 * max_len as f64 * cfg.hidden_size as f64;
    let shape = format!("BERT-base, {} x {max_len} tokens, per step", b.sequences);
    let row = |name: String, ms: f64| crate::device::KernelTiming {
        name,
        shape: shape.clone(),
        ms: ms * layers,
        bytes: 0.0,
        flops,
    };
    let gpu = &enc.gpu;
    let k = &enc.k;
    if let (Some(m), Some((_, f))) = (&enc.mixed, &k.attention_mma) {
        let (qkv, ctx) = (ptr(&m.layers[0].qkv, st), ptr(&m.layers[0].ctx, st));
        let name = format!("rrra_attention_train_mma_bf16_d{}", cfg.head_dim());
        let mut rows = Vec::new();
        for q in [0.0, p] {
            let ms = gpu.time_ms(5, || {
                enc.attention_mma(f, qkv, bias, b, q, max_len, slot, ctx)
            })?;
            rows.push(row(format!("{name} (dropout {q})"), ms));
        }
        return Ok(rows);
    }
    let (qkv, ctx) = (ptr(&enc.layers[0].qkv, st), ptr(&enc.layers[0].ctx, st));
    let simt = gpu.time_ms(5, || {
        k.attention
            .launch(st, cfg, qkv, bias, offs, b.sequences, max_len, ctx)
    })?;
    let simt_drop = gpu.time_ms(5, || {
        enc.attention_dropout(qkv, bias, b, max_len, slot, ctx)
    })?;
    Ok(vec![
        row(format!("{} (f32, no dropout)", k.attention.name), simt),
        row(
            format!("rrra_train_attention_dropout_f32 (dropout {p})"),
            simt_drop,
        ),
    ])
}

/// The device check's rows of the step's products alone, at the shape of [`bench()`], per step
/// (one layer's twelve, times the layers): forward QKV, attention output, FFN in and out, and
/// each one's input gradient and accumulated weight gradient, as `linear` and
/// `linear_backward` call them. First with f32 matrices in each [`GemmMath`] (the f32
/// activations' step), then with bf16 activations and weights (bf16 outputs, f32 weight
/// gradients; f32 accumulation throughout), close to what the bf16-activation step runs (its
/// products write f32 where a residual sum follows).
pub fn bench_products(gpu: &Gpu) -> Result<Vec<crate::device::KernelTiming>> {
    use crate::device::runtime::{gemm_row_major, Operands};
    let cfg = crate::model::synthetic::bert_base_config();
    // the step of `bench`: 64 × 9 sequences of 128 tokens
    let (t, h, i) = (64 * 9 * 128, cfg.hidden_size, cfg.intermediate_size);
    // (inputs, outputs) of the four linear layers
    let linears = [(h, 3 * h), (h, h), (h, i), (i, h)];
    let widest = i.max(3 * h);
    let stream = gpu.stream();
    let mut blas = cublas_f32(stream)?;
    // non-zero data: tensor cores draw less power (and clock higher) on zeros
    let pattern: Vec<f32> = (0..1usize << 20)
        .map(|j| ((j * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let pattern_bf16: Vec<u16> = pattern
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let filled = |n: usize| -> Result<CudaSlice<f32>> {
        let mut b = alloc::<f32>(stream, n, "product operands")?;
        fill_with(stream, &mut b, &pattern)?;
        Ok(b)
    };
    let filled_bf16 = |n: usize| -> Result<CudaSlice<u16>> {
        let mut b = alloc::<u16>(stream, n, "product operands")?;
        fill_with(stream, &mut b, &pattern_bf16)?;
        Ok(b)
    };
    // x: layer inputs (and input gradients), y: outputs (and output gradients), w: weights,
    // gw: weight gradients
    let (x, y, w, gw) = (
        filled(t * widest)?,
        filled(t * widest)?,
        filled(widest * h)?,
        filled(widest * h)?,
    );
    let (xb, yb, wb) = (
        filled_bf16(t * widest)?,
        filled_bf16(t * widest)?,
        filled_bf16(widest * h)?,
    );
    let p32 = |b: &CudaSlice<f32>| ptr(b, stream);
    let p16 = |b: &CudaSlice<u16>| ptr(b, stream);
    let layers = cfg.num_hidden_layers as f64;
    let flops =
        layers * 3.0 * 2.0 * t as f64 * linears.iter().map(|&(a, b)| (a * b) as f64).sum::<f64>();
    let shape = format!("BERT-base step, {t} tokens: 4 forward + 8 backward products x {layers}");
    // one layer's products (forward, input gradient, weight gradient of each linear layer) with
    // these operand types, on these matrices
    let layer = |blas: &F32Blas, (fwd, dx, dw), (x, y, w, gw): (u64, u64, u64, u64)| {
        for &(inp, out) in &linears {
            // SAFETY: x and y hold t × widest elements, w and gw widest × h, of the types the
            // operands say: at least what each shape reads and writes.
            unsafe {
                gemm_row_major(blas, (false, true, t, out, inp), fwd, x, w, 0.0, y)?;
                gemm_row_major(blas, (false, false, t, inp, out), dx, y, w, 0.0, x)?;
                gemm_row_major(blas, (true, false, out, inp, t), dw, y, x, 1.0, gw)?;
            }
        }
        Ok(())
    };
    let mut rows = Vec::new();
    for math in [GemmMath::F32, GemmMath::Tf32, GemmMath::Bf16] {
        blas.math = math;
        let f32s = (Operands::F32, Operands::F32, Operands::F32);
        let ms = gpu.time_ms(3, || {
            layer(&blas, f32s, (p32(&x), p32(&y), p32(&w), p32(&gw)))
        })?;
        rows.push(crate::device::KernelTiming {
            name: format!("step products, f32 matrices, {math} math (cublasGemmEx)"),
            shape: shape.clone(),
            ms: ms * layers,
            bytes: 0.0,
            flops,
        });
    }
    let bf16s = (Operands::Bf16Out, Operands::Bf16Out, Operands::Bf16);
    let ms = gpu.time_ms(3, || {
        layer(&blas, bf16s, (p16(&xb), p16(&yb), p16(&wb), p32(&gw)))
    })?;
    rows.push(crate::device::KernelTiming {
        name: "step products, bf16 activations and weights, f32 weight gradients".into(),
        shape,
        ms: ms * layers,
        bytes: 0.0,
        flops,
    });
    Ok(rows)
}

/// Fills `buf` with copies of `pattern` (host to device, one pattern at a time).
fn fill_with<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    pattern: &[T],
) -> Result<()> {
    let n = buf.len();
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        stream
            .memcpy_htod(&pattern[..len], &mut buf.slice_mut(at..at + len))
            .map_err(cuda_err("filling product operands"))?;
        at += len;
    }
    Ok(())
}
