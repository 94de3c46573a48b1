/* options.c - the environment variables of the model options: the one place
 * the library reads them (README.md, "Environment"). */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"

/* set when the variable is set and not "0" (or equal to `value` if given) */
static int env_flag(const char *name, const char *value) {
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    return value ? !strcmp(v, value) : strcmp(v, "0") != 0;
}

int moe_precision_parse(const char *s) {
    if (s && !strcmp(s, "f32")) return MOE_PRECISION_F32;
    if (s && !strcmp(s, "bf16")) return MOE_PRECISION_BF16;
    return -1;
}

void moe_model_opts_from_env(moe_model_opts *o) {
    const char *prec = getenv("MOE_PRECISION");
    if (!o->precision && prec && *prec) {
        int p = moe_precision_parse(prec);
        if (p < 0)
            moe_warn("MOE_PRECISION='%s' ignored (expected f32 or bf16)", prec);
        else
            o->precision = p;
    }
    o->cpu_f32_weights |= env_flag("MOE_CPU_WEIGHTS", "f32");
    o->cpu_copy_bf16 |= env_flag("MOE_CPU_BORROW", "0");
    o->cpu_no_populate |= env_flag("MOE_CPU_POPULATE", "0");
    o->stage_f32 |= env_flag("MOE_STAGE_F32", NULL);
    const char *dev = getenv("MOE_CUDA_DEVICE");
    if (!o->dev.device_index && dev && *dev) o->dev.device_index = atoi(dev);
    o->dev.sync_each_op |= env_flag("MOE_CUDA_SYNC", NULL);
    o->dev.f32_compute |= env_flag("MOE_CUDA_PRECISION", "f32");
}
