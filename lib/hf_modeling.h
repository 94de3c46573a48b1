/* hf_modeling.h - hf/modeling_cdmoe.py, compiled in (see the Makefile).
 *
 * moe-condense writes it into every checkpoint beside config.json, whose
 * "auto_map" names its classes, so that transformers loads the condensed
 * model with trust_remote_code=True. */
#ifndef MOE_HF_MODELING_H
#define MOE_HF_MODELING_H

#define MOE_HF_MODELING_FILE "modeling_cdmoe.py"
extern const char moe_hf_modeling_py[]; /* NUL-terminated text */

#endif
