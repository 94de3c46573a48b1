/* gpu_forward.c - helpers of bench/gpu-check.sh for whole-model runs.
 *
 *   gpu_forward tokens --model DIR --seqs N --len T [--seed S] -o FILE
 *       write a moe-stream of kind "tokens" (records {"sample", "ids"}) of N
 *       random sequences of T ids below the model's vocabulary, with the
 *       model's fingerprint in the provenance (so moe-calib accepts it);
 *   gpu_forward forward --model DIR --seqs N --len T [--check-tokens C]
 *       time one layer-major forward of N random sequences of T tokens on the
 *       CUDA backend (no dumps), then, with --check-tokens C, run the first C
 *       tokens of sequence 0 on the CPU and the GPU and compare the logits.
 *       Prints one JSON object (time, tokens/s, peak GPU memory, rel. error).
 * Exits 77 ("SKIP: ...") for `forward` without a GPU. */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "kernels.h"
#include "model.h"
#include "stream.h"
#include "gpu_bench.h"

static int die(const char *what) {
    fprintf(stderr, "gpu_forward %s: %s\n", what, moe_error());
    return moe_error_kind() == MOE_ERR_DEVICE ? 4 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: gpu_forward tokens|forward --model DIR --seqs N --len T ...\n");
        return 2;
    }
    const char *cmd = argv[1], *model = NULL, *out = NULL;
    int n = 8, T = 256, check = 0;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"seqs", required_argument, 0, 'n'},
                                       {"len", required_argument, 0, 't'},
                                       {"seed", required_argument, 0, 's'},
                                       {"check-tokens", required_argument, 0, 'c'},
                                       {"output", required_argument, 0, 'o'},
                                       {0, 0, 0, 0}};
    int c;
    rng_state = 1;
    optind = 2;
    while ((c = getopt_long(argc, argv, "o:", lo, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'n': n = atoi(optarg); break;
        case 't': T = atoi(optarg); break;
        case 's': rng_state = strtoull(optarg, NULL, 10); break;
        case 'c': check = atoi(optarg); break;
        case 'o': out = optarg; break;
        default: return 2;
        }
    }
    if (!model || n <= 0 || T <= 0) {
        fprintf(stderr, "gpu_forward: --model, --seqs and --len are required\n");
        return 2;
    }

    if (!strcmp(cmd, "tokens")) {
        if (!out) return 2;
        moe_model_opts o = {.device = "cpu"};
        moe_model_opts_from_env(&o);
        moe_model *m = moe_model_open(model, &o);
        if (!m) return die("tokens");
        int V = moe_model_config(m)->vocab_size;
        moe_provenance prov = {"gpu_forward", argc, argv, moe_model_fingerprint(m), "tokens"};
        moe_writer *w = moe_writer_open(out, NULL, &prov, 0);
        if (!w) return die("tokens");
        int32_t **ids = random_ids(n, T, V);
        for (int s = 0; s < n; s++) {
            msgpack_packer *pk = moe_writer_record(w, "tokens", 2);
            int64_t shape[1] = {T};
            moe_pack_kv_int(pk, "sample", s);
            moe_pack_kv_array(pk, "ids", MOE_DT_I32, 1, shape, ids[s]);
            free(ids[s]);
        }
        free(ids);
        if (moe_writer_close(w) < 0) return die("tokens");
        moe_model_close(m);
        return 0;
    }
    if (strcmp(cmd, "forward") != 0) return 2;

    if (no_cuda_device()) return 77;
    moe_model_opts o = {.device = "cuda"};
    moe_model_opts_from_env(&o);
    moe_model *m = moe_model_open(model, &o);
    if (!m) return die("forward");
    const moe_config *cf = moe_model_config(m);
    int V = cf->vocab_size, L = cf->num_layers;
    moe_cuda_mem_reset_peak();
    int32_t **ids = random_ids(n, T, V);
    moe_seq *seqs = calloc((size_t)n, sizeof *seqs);
    for (int s = 0; s < n; s++) seqs[s] = (moe_seq){ids[s], T, NULL, NULL};
    double t0 = moe_now();
    if (moe_model_forward(m, seqs, n, 0, NULL, NULL) < 0) return die("forward");
    const moe_backend *be = moe_model_backend(m);
    be->sync();
    double secs = moe_now() - t0;
    if (moe_backend_status(be) < 0) return die("forward");
    moe_cuda_mem mem;
    moe_cuda_mem_stats(&mem);
    moe_model_close(m);

    double rel = -1;
    if (check > 0) { /* logits of the first `check` tokens: GPU vs CPU */
        if (check > T) check = T;
        float *lg[2];
        for (int d = 0; d < 2; d++) {
            moe_model_opts od = {.device = d ? "cpu" : "cuda"};
            moe_model_opts_from_env(&od);
            moe_model *md = moe_model_open(model, &od);
            if (!md) return die("check");
            lg[d] = malloc(sizeof(float) * (size_t)check * V);
            moe_seq one = {ids[0], check, NULL, lg[d]};
            if (moe_model_forward(md, &one, 1, 0, NULL, NULL) < 0) return die("check");
            moe_model_close(md);
        }
        double num = 0, den = 0;
        for (size_t i = 0; i < (size_t)check * V; i++) {
            double e = (double)lg[0][i] - lg[1][i];
            num += e * e;
            den += (double)lg[1][i] * lg[1][i];
        }
        rel = den > 0 ? sqrt(num / den) : sqrt(num);
        free(lg[0]), free(lg[1]);
    }
    printf("{\"device\":\"%s\",\"layers\":%d,\"seqs\":%d,\"len\":%d,\"seconds\":%.3f,"
           "\"tokens_per_s\":%.0f,\"backend_peak_bytes\":%zu,\"device_used_peak_bytes\":%zu,"
           "\"check_tokens\":%d,\"logits_rel_err_vs_cpu\":%.3g}\n",
           moe_cuda_device_name(), L, n, T, secs, (double)n * T / secs, mem.peak, mem.used_peak,
           check, rel);
    for (int s = 0; s < n; s++) free(ids[s]);
    free(ids), free(seqs);
    return rel > 5e-2 ? 1 : 0;
}
