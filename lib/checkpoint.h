/* checkpoint.h - a Hugging Face model directory: config.json + safetensors.
 *
 * Layouts read:
 *   DIR/config.json + DIR/model.safetensors, or
 *   DIR/config.json + DIR/model.safetensors.index.json ("weight_map": tensor
 *   name -> shard file name; each distinct shard is opened once, and a tensor
 *   is taken from the shard the map names; a tensor missing from its shard is
 *   an error).
 * pytorch_model*.bin (pickle) checkpoints are refused with a clear error.
 *
 * Tensor names: hub checkpoints and transformers 5.x save_pretrained (checked
 * with transformers 5.24: Qwen2Moe, Qwen3Moe, Olmoe, Mixtral) both write
 * per-expert tensors (mlp.experts.{j}.gate_proj.weight, Mixtral
 * block_sparse_moe.experts.{j}.w1.weight); transformers 5 fuses them only in
 * memory and splits them back on save.  Fused on-disk names
 * (mlp.experts.gate_up_proj [E, 2*I, H], mlp.experts.down_proj [E, H, I]) are
 * therefore not expected; if found instead of per-expert tensors, open fails
 * with an error saying so.
 *
 * Validation at open: every tensor moe_config_tensor_list() implies is
 * present with exactly the implied shape and a float dtype (F32, F16, BF16;
 * F64 accepted), else an error such as
 *   "DIR/model.safetensors: tensor model.layers.0.self_attn.q_proj.weight:
 *    shape [64, 32], expected [32, 32] (config.json: hidden_size 32, ...)"
 *   "DIR: tensor model.layers.1.mlp.gate.weight missing (model.safetensors)".
 * Extra tensors (e.g. rotary inv_freq buffers, unused experts of condensed
 * layers, the router of a condensed layer, a tied lm_head) are ignored;
 * moe_ckpt_n_extra() counts them and moe_ckpt_extra() names them, for a tool
 * that wants to warn.
 *
 * Memory: the files are mapped, nothing is read at open except the headers.
 * Read a tensor as float32 when needed, then moe_ckpt_release_layer() (or
 * moe_st_release() per tensor) so the resident set stays near one layer.
 *
 * Fingerprint: SHA-256 over the canonical config.json (parsed and re-dumped
 * compact with sorted keys) and, for every tensor in name order, its name,
 * dtype and shape; 64 lowercase hex chars.  Cheap: no tensor data is read.
 * Two checkpoints with the same config and tensor headers but different
 * weights have the same fingerprint (it identifies the model shape and
 * configuration for stream provenance, not the weights). */
#ifndef MOE_CHECKPOINT_H
#define MOE_CHECKPOINT_H

#include "config.h"
#include "safetensors.h"

typedef struct moe_ckpt moe_ckpt;

/* Open and validate a model directory.  NULL with an error on failure. */
moe_ckpt *moe_ckpt_open(const char *dir);
void moe_ckpt_close(moe_ckpt *m);
const moe_config *moe_ckpt_config(const moe_ckpt *m);
const char *moe_ckpt_dir(const moe_ckpt *m);
const char *moe_ckpt_fingerprint(const moe_ckpt *m); /* 64 hex chars */
/* Total bytes of tensor payload across all files. */
uint64_t moe_ckpt_bytes(const moe_ckpt *m);
/* The common dtype of the weights (e.g. MOE_DT_BF16), or -1 if mixed. */
int moe_ckpt_dtype(const moe_ckpt *m);

/* Extra tensors (present in the files but not implied by the config). */
int moe_ckpt_n_extra(const moe_ckpt *m);
const char *moe_ckpt_extra(const moe_ckpt *m, int i);

/* Any tensor by name; NULL (no error set) if absent. */
const moe_st_tensor *moe_ckpt_find(const moe_ckpt *m, const char *name);
/* A tensor the config implies (validated at open); NULL with an error if the
 * config says it does not exist for this layer (see moe_config_has_tensor). */
const moe_st_tensor *moe_ckpt_get(const moe_ckpt *m, int layer, moe_tensor_kind k, int expert);

/* Read as float32 into dst (prod(shape) floats; the shape is the config's,
 * see moe_config_tensor_shape).  Converts BF16/F16/F64.  0 or -1. */
int moe_ckpt_read_f32(const moe_ckpt *m, int layer, moe_tensor_kind k, int expert, float *dst);
/* Read any tensor by name, checking its shape against (ndim, shape):
 * "FILE: tensor NAME: shape [a, b], expected [c, d]".  0 or -1. */
int moe_ckpt_read_named_f32(const moe_ckpt *m, const char *name, int ndim,
                            const int64_t *shape, float *dst);

/* Page advice for all tensors of a layer (layer -1: the globals).
 * prefetch = MADV_WILLNEED; release = MADV_DONTNEED (+ POSIX_FADV_DONTNEED for
 * big files, see moe_st_release). */
void moe_ckpt_prefetch_layer(const moe_ckpt *m, int layer);
void moe_ckpt_release_layer(const moe_ckpt *m, int layer);
void moe_ckpt_release_all(const moe_ckpt *m);

/* ---- writing a model directory ---------------------------------------- */

typedef struct moe_ckpt_writer moe_ckpt_writer;

/* Start writing model directory `dir`.  Everything goes into a temporary
 * directory beside it (moe_tmp_path), renamed into place by close.  If `dir`
 * exists: error "DIR: exists (use --force to replace it)" unless force, in
 * which case it is replaced at close (only if the new one was written
 * completely).  shard_bytes: split the tensors into shards of at most that
 * many payload bytes (a single larger tensor gets its own shard);
 * 0 = one model.safetensors. */
moe_ckpt_writer *moe_ckpt_writer_open(const char *dir, uint64_t shard_bytes, int force);
/* The temporary directory, for writing extra files (config.json,
 * tokenizer.json...) before close. */
const char *moe_ckpt_writer_tmpdir(const moe_ckpt_writer *w);
/* Write a small text file into the temporary directory.  0 or -1. */
int moe_ckpt_writer_text(moe_ckpt_writer *w, const char *filename, const char *text);
/* Declare a tensor, as moe_st_writer_add.  Shard assignment follows the
 * order of declaration. */
int moe_ckpt_writer_add(moe_ckpt_writer *w, const char *name, moe_dtype dt, int ndim,
                        const int64_t *shape, const void *data, moe_st_fill_fn fill, void *ctx);
/* Write the shard files (model.safetensors, or model-00001-of-0000N.safetensors
 * + model.safetensors.index.json with metadata.total_size and a sorted
 * weight_map), then rename the directory into place.  Frees w.  0 or -1
 * (temporary directory removed). */
int moe_ckpt_writer_close(moe_ckpt_writer *w);
void moe_ckpt_writer_abort(moe_ckpt_writer *w);

#endif
