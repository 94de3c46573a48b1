/* fuzz_task.c - the task readers of lib/eval_tasks.c (mc, schema, lm, piqa
 * with its labels file, winogrande, hellaswag, rte, and format detection).
 * Byte 0: bits 0-2 the format (0 = detect), bit 3 a labels file (the input
 * is then split at its first NUL byte: task file, labels file), bit 4 an
 * explicit delimiter, bits 5-6 the --limit. */
#include "fuzz.h"

#include "eval.h"

static const char *const formats[] = {NULL, "mc", "schema", "lm", "piqa", "winogrande", "hellaswag", "rte"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned sel = fuzz_selector(&data, &size);
    const char *dir = fuzz_dir();
    size_t task_len = size;
    const uint8_t *labels = NULL;
    size_t labels_len = 0;
    if (sel & 8) {
        const uint8_t *nul = memchr(data, 0, size);
        if (nul) {
            task_len = (size_t)(nul - data);
            labels = nul + 1;
            labels_len = size - task_len - 1;
        }
    }
    fuzz_put(dir, "dev.jsonl", data, task_len);
    char labels_path[1100], task_path[1100];
    snprintf(labels_path, sizeof labels_path, "%s/dev-labels.lst", dir);
    snprintf(task_path, sizeof task_path, "%s/dev.jsonl", dir);
    if (labels) fuzz_put(dir, "dev-labels.lst", labels, labels_len);
    else unlink(labels_path);
    moe_task *t = moe_task_load(task_path, formats[sel & 7], sel & 16 ? " " : NULL, (long)((sel >> 5) & 3));
    if (t) {
        for (int i = 0; i < t->n_items; i++) {
            const moe_task_item *it = &t->items[i];
            if (it->gold < 0 || it->gold >= it->n) abort(); /* a loaded gold is a valid choice */
            for (int j = 0; j < it->n; j++)
                if (!it->ctx[j] || !it->cont[j]) abort();
        }
    }
    moe_task_free(t);
    return 0;
}
