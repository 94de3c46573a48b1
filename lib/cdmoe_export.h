/* cdmoe_export.h - our streams in the shape of the original CD-MoE code's
 * JSON files, for users who continue with its scripts:
 *   weights  dynamic_weight.json                {"O-E": [sum, count, mean]}
 *   experts  layer_idx_to_expert_idx.json       {"O": [e1, e2, ...]}
 *   order    layer_idx_order.json               [o1, o2, ...]
 * O is the MoE-layer ordinal (0 = first MoE layer) the original uses; the
 * ordinals come from the stream's calib records (key "moe_ordinal"), so the
 * stream must hold moe-calib's output. */
#ifndef MOE_CDMOE_EXPORT_H
#define MOE_CDMOE_EXPORT_H

#include <stdio.h>

#include "stream.h"

/* what: "weights", "experts" or "order".  Reads r to its end, writes one
 * JSON document to out.  0 or -1 (error set). */
int moe_cdmoe_export(moe_reader *r, const char *what, FILE *out);

#endif
