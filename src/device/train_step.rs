//! The encoder's optimizer step kept on the GPU: [`GpuTrainStep`] is a
//! [`GpuTrainableEncoder`] plus a [`GpuAdamW`] over its tensors, so a training run moves only
//! embeddings and their gradients between host and device, never weights or parameter
//! gradients (`train::encoder_grad::ResidentOptimizer`).
//!
//! A step: the micro-batches' backwards add into the encoder's gradient buffers (zeroed at the
//! start of the step); `update` copies them device to device into the optimizer's flat buffer,
//! runs the fused norm, clip and AdamW kernels with the trainer's `1 / micro-batches` scale
//! folded in, and copies the new master weights back into the encoder's buffers. The two
//! copies move 4 × 4 bytes per parameter (1.8 GB for BERT-base, ~0.5 ms at H200 bandwidth)
//! next to a step of ~10² ms; sharing one buffer would remove them, at the price of the
//! encoder addressing its tensors inside the optimizer's.
//!
//! Data parallel: the ranks' gradients are summed where they are. Over NCCL
//! (`train::collective::nccl`, whose stream belongs to this GPU's context) each layer's gradients
//! are summed in place as soon as the step's last backward has finished them, on the
//! communicator's stream, so the sums overlap the backward of the layers below; the update
//! waits for the last one. Over any other collective (the in-process ranks of the tests) they
//! go through the host after the backward. Both issue the sums in the order of
//! `train::parallel::backward_groups`, so ranks taking either path still match call for call.
//!
//! Against the host optimizer: the update is the CPU's arithmetic (`kernels/adamw.cu`), but
//! the gradients it sees are the GPU backward's, accumulated over micro-batches in the
//! weight-gradient GEMMs (beta = 1) rather than summed after each, so a run agrees with the
//! CPU path to f32 tolerances, not bits (tests/gpu_train_run.rs).

use super::adamw::GpuAdamW;
use super::encoder_train::GpuTrainableEncoder;
use super::runtime::{cuda_err, GemmMath, Gpu};
use crate::error::{Error, Result};
use crate::model::bert::Bert;
use crate::model::pooling::Pooling;
use crate::model::weights::BertWeights;
use crate::train::collective::Collective;
use crate::train::encoder_grad::{DropoutPlan, OffloadedEncoder, ResidentOptimizer, TrainBatch};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::backward_groups;

/// A BERT encoder, its gradients and its AdamW state resident on one GPU.
pub struct GpuTrainStep {
    gpu: Gpu,
    encoder: GpuTrainableEncoder,
    optim: GpuAdamW,
    /// Host buffer for sums over ranks that go through the host.
    staging: Vec<f32>,
}

impl GpuTrainStep {
    /// Uploads `bert` and a fresh AdamW state (`cfg`, zero moments; [`ResidentOptimizer::load`]
    /// replaces it) and sizes the buffers like [`GpuTrainableEncoder::new`].
    pub fn new(
        gpu: &Gpu,
        bert: &Bert,
        pooling: Pooling,
        normalize: bool,
        cfg: AdamWConfig,
        max_tokens: usize,
        max_sequences: usize,
    ) -> Result<GpuTrainStep> {
        let encoder =
            GpuTrainableEncoder::new(gpu, bert, pooling, normalize, max_tokens, max_sequences)?;
        let params = bert.weights.tensors();
        let decay = bert.weights.decay_flags();
        let optim = GpuAdamW::new(gpu, cfg, &params, &decay, false)?;
        Ok(GpuTrainStep {
            gpu: gpu.clone(),
            encoder,
            optim,
            staging: Vec::new(),
        })
    }

    /// The optimizer's step count.
    pub fn optimizer_step(&self) -> u64 {
        self.optim.step
    }

    /// The arithmetic of the encoder's products and the storage of its activations (see
    /// [`GpuTrainableEncoder::set_gemm_math`]).
    pub fn set_gemm_math(&mut self, math: GemmMath) -> Result<()> {
        self.encoder.set_gemm_math(math)
    }

    /// `comm`'s NCCL communicator when its stream is on this GPU's context, so that it can
    /// sum the gradient buffers in place and be ordered against the encoder's stream.
    #[cfg(feature = "nccl")]
    fn device_comm<'c>(
        &self,
        comm: &'c dyn Collective,
    ) -> Option<&'c crate::train::collective::nccl::Nccl> {
        let ours = self.encoder.stream().context();
        comm.nccl()
            .filter(|n| std::sync::Arc::ptr_eq(n.stream().context(), ours))
    }

    /// Sums the gradients over the ranks through host memory, tensor by tensor in the order
    /// of `backward_groups`.
    fn all_reduce_through_host(&mut self, comm: &dyn Collective) -> Result<()> {
        let st = self.encoder.stream().clone();
        let layers = self.encoder.config().num_hidden_layers;
        let grads = self.encoder.device_grads_mut();
        for group in backward_groups(layers) {
            for g in &mut grads[group] {
                self.staging.resize(g.len(), 0.0);
                // into pageable memory: returns when the copy is done
                st.memcpy_dtoh(g, &mut self.staging[..])
                    .map_err(cuda_err("downloading gradients"))?;
                comm.all_reduce_sum(&mut self.staging)?;
                st.memcpy_htod(&self.staging[..], g)
                    .map_err(cuda_err("uploading summed gradients"))?;
            }
        }
        Ok(())
    }
}

/// An event recorded on `stream` (no timing), for another stream to wait on.
#[cfg(feature = "nccl")]
fn mark(stream: &cudarc::driver::CudaStream) -> Result<cudarc::driver::CudaEvent> {
    use cudarc::driver::sys::CUevent_flags;
    stream
        .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(cuda_err("recording an event"))
}

/// `after` waits, on the device, for the work queued on `before` so far.
#[cfg(feature = "nccl")]
fn order(before: &cudarc::driver::CudaStream, after: &cudarc::driver::CudaStream) -> Result<()> {
    after
        .wait(&mark(before)?)
        .map_err(cuda_err("waiting for an event"))
}

impl ResidentOptimizer for GpuTrainStep {
    fn load(&mut self, weights: &BertWeights, optim: &AdamW) -> Result<()> {
        let m: Vec<&[f32]> = optim.m.iter().map(Vec::as_slice).collect();
        let v: Vec<&[f32]> = optim.v.iter().map(Vec::as_slice).collect();
        self.optim.cfg = optim.cfg;
        self.optim.set_moments(&self.gpu, &m, &v, optim.step)?;
        self.optim.set_params(&self.gpu, &weights.tensors())?;
        self.optim
            .store_params(&self.gpu, self.encoder.device_weights_mut())?;
        self.gpu.synchronize()
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.encoder.zero_grads()
    }

    fn accumulate(&mut self, d_embeddings: &[f32]) -> Result<()> {
        self.encoder.accumulate_backward(d_embeddings)
    }

    fn all_reduce_grads(&mut self, comm: &dyn Collective) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(nccl) = self.device_comm(comm) {
            let st = self.encoder.stream().clone();
            order(&st, nccl.stream())?;
            let layers = self.encoder.config().num_hidden_layers;
            let grads = self.encoder.device_grads_mut();
            for group in backward_groups(layers) {
                nccl.all_reduce_device(&mut grads[group])?;
            }
            return order(nccl.stream(), &st);
        }
        self.all_reduce_through_host(comm)
    }

    fn accumulate_and_reduce(&mut self, d_embeddings: &[f32], comm: &dyn Collective) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(nccl) = self.device_comm(comm) {
            // each group's sum waits for its last gradient kernel, then runs beside the
            // backward of the layers below
            self.encoder
                .accumulate_backward_with(d_embeddings, &mut |st, group| {
                    order(st, nccl.stream())?;
                    nccl.all_reduce_device(group)
                })?;
            // the update reads the sums
            return order(nccl.stream(), self.encoder.stream());
        }
        self.accumulate(d_embeddings)?;
        self.all_reduce_through_host(comm)
    }

    fn update(&mut self, scale: f32, max_norm: f32, lr: f32) -> Result<f32> {
        self.optim
            .load_grads(&self.gpu, self.encoder.device_grads())?;
        let norm = self.optim.step_scaled(&self.gpu, scale, lr, max_norm)?;
        if norm.is_finite() {
            self.optim
                .store_params(&self.gpu, self.encoder.device_weights_mut())?;
        }
        Ok(norm)
    }

    fn store(&mut self, into: &mut BertWeights, optim: &mut AdamW) -> Result<()> {
        let params = self.optim.params(&self.gpu)?;
        let m = self.optim.first_moments(&self.gpu)?;
        let v = self.optim.second_moments(&self.gpu)?;
        let mut host = into.tensors_mut();
        if host.len() != params.len() || optim.m.len() != m.len() || optim.v.len() != v.len() {
            return Err(Error::InvalidArgument(
                "weights or optimizer of another shape than the encoder on the GPU".into(),
            ));
        }
        for ((dst, _), src) in host.iter_mut().zip(params) {
            if dst.len() != src.len() {
                return Err(Error::InvalidArgument(
                    "weights of another shape than the encoder on the GPU".into(),
                ));
            }
            **dst = src;
        }
        optim.m = m;
        optim.v = v;
        optim.step = self.optim.step;
        optim.cfg = self.optim.cfg;
        Ok(())
    }
}

/// The trainer's hook: forward, loss, backward and the optimizer step all on this GPU.
impl OffloadedEncoder for GpuTrainStep {
    fn set_weights(&mut self, weights: &BertWeights) -> Result<()> {
        // the master copy and the encoder's; the moments stay
        self.optim.set_params(&self.gpu, &weights.tensors())?;
        self.encoder.set_weights(weights)
    }
    fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> Result<Vec<f32>> {
        self.encoder.forward_train(batch, dropout)
    }
    fn backward(&mut self, _: &[f32], _: &mut BertWeights) -> Result<()> {
        // the host-accumulating backward would zero the device gradients this step is summing
        Err(Error::InvalidArgument(
            "a resident training step accumulates its gradients on the device: use \
             ResidentOptimizer::accumulate"
                .into(),
        ))
    }
    fn encode(&mut self, texts: &[crate::model::tokenizer::Tokens]) -> Result<Vec<f32>> {
        self.encoder.encode(texts)
    }
    fn search(
        &mut self,
        docs: &[f32],
        queries: &[f32],
        dim: usize,
        depth: usize,
    ) -> Option<Result<Vec<Vec<crate::index::Hit>>>> {
        self.encoder.search(docs, queries, dim, depth)
    }
    fn info_nce(
        &mut self,
        input: &crate::train::loss::InfoNceInput<'_>,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Option<Result<crate::train::loss::InfoNceStats>> {
        self.encoder.info_nce(input, dq, dd)
    }
    fn resident(&mut self) -> Option<&mut dyn ResidentOptimizer> {
        Some(self)
    }
    fn adapter_op(
        &mut self,
        d: usize,
        h: usize,
        max_queries: usize,
        max_pairs: usize,
    ) -> Option<Result<Box<dyn crate::adapter::fit::AdapterOp>>> {
        // placeholder weights of the right shapes: each call uploads the current ones
        let op = crate::adapter::AdapterParams::init(d, h, 0).and_then(|p| {
            super::adapter_train::GpuAdapterGrad::new(&self.gpu, &p, max_queries, max_pairs)
        });
        Some(op.map(|o| Box::new(o) as Box<dyn crate::adapter::fit::AdapterOp>))
    }
}

/// The device check's rows: a whole BERT-base training step at the target shape (64 queries,
/// a positive and 7 hard negatives each, 128 tokens, dropout 0.1) as the trainer runs it:
/// forward, the fused InfoNCE, backward and the AdamW update with clipping, on the device (the
/// embeddings and their gradients cross to the host and back, 1.8 MB each way), once per GEMM
/// arithmetic.
pub fn bench(gpu: &Gpu) -> Result<Vec<super::KernelTiming>> {
    use crate::model::synthetic::{batch_with_lengths, bert_base_config, random_bert};
    let cfg = bert_base_config();
    let bert = random_bert(cfg.clone(), 1);
    let seqs = 64 * 9;
    let batch = batch_with_lengths(&cfg, &vec![128; seqs], 2);
    let tb = TrainBatch {
        example_ids: (0..seqs as u64).collect(),
        packed: batch,
    };
    let mut step = GpuTrainStep::new(
        gpu,
        &bert,
        Pooling::Mean,
        true,
        AdamWConfig::default(),
        tb.packed.tokens(),
        seqs,
    )?;
    // the loss as the trainer computes it: the fused InfoNCE of the first 64 embeddings (the
    // queries) against the other 512 (each query's positive, then its 7 negatives)
    let (queries, h) = (64usize, cfg.hidden_size);
    let targets: Vec<usize> = (0..queries).map(|b| b * 8).collect();
    let mut d_emb = vec![0.0f32; seqs * h];
    // BERT-base's dropout, as the PyTorch peer trains with it
    let dropout = DropoutPlan {
        hidden: 0.1,
        attention: 0.1,
        seed: 1,
        step: 0,
    };
    // the update adds ~17 flops per parameter, not counted
    let flops = super::encoder_train::training_step_flops(&cfg, tb.packed.tokens(), 128);
    let mut rows = Vec::new();
    for math in [GemmMath::F32, GemmMath::Tf32, GemmMath::Bf16] {
        step.set_gemm_math(math)?;
        let ms = gpu.time_ms(3, || {
            step.zero_grads()?;
            let emb = step.encoder.forward_train(&tb, &dropout)?;
            let (q, d) = emb.split_at(queries * h);
            let (dq, dd) = d_emb.split_at_mut(queries * h);
            let input = crate::train::loss::InfoNceInput {
                queries: q,
                docs: d,
                dim: h,
                targets: &targets,
                log_weights: None,
                tau: 0.05,
            };
            OffloadedEncoder::info_nce(&mut step, &input, dq, dd)
                .unwrap_or_else(|| Err(Error::Cuda("the GPU step computes no loss".into())))?;
            step.accumulate(&d_emb)?;
            let norm = step.update(1.0, 1.0, 1e-5)?;
            if norm.is_finite() {
                Ok(())
            } else {
                Err(Error::Cuda(format!(
                    "the bench step's gradient norm is {norm}"
                )))
            }
        })?;
        rows.push(super::KernelTiming {
            name: format!(
                "encoder training step + rrra_infonce + rrra_adamw ({math} products, f32 \
                 activations, weights resident)"
            ),
            shape: format!(
                "BERT-base, {seqs} x 128 tokens, dropout 0.1, forward + InfoNCE + backward + AdamW"
            ),
            ms,
            bytes: 0.0,
            flops,
        });
    }
    Ok(rows)
}
