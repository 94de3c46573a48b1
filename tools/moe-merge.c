/* moe-merge - join moe-streams into one: records of each input in order,
 * kinds and provenance united.  Used to join shards of work that was spread
 * over machines (e.g. moe-expert-rank --layers on disjoint layer sets). */
#include "cli.h"
#include "sha256.h"
#include "stream.h"

#include <stdlib.h>
#include <string.h>

static const char help[] =
    "Usage: moe-merge [OPTIONS] STREAM... > MERGED.msgpack.zst\n"
    "Join moe-streams: the records of every input, in the order given, after one\n"
    "header whose kinds and provenance unite the inputs' (each entry once).\n"
    "Records that several inputs share unchanged (e.g. the token records that\n"
    "every shard carried through) are written once.\n"
    "\n"
    "  -o, --output FILE  write here instead of standard output\n"
    "With --force, inputs made with different models are joined anyway.\n";

/* Is `o` deep-equal to one of list[0..n)? (msgpack objects compare by value) */
static int contains(msgpack_object *list, uint32_t n, const msgpack_object *o) {
    for (uint32_t i = 0; i < n; i++)
        if (msgpack_object_equal(list[i], *o)) return 1;
    return 0;
}

/* Build the merged header in a zone: union of kinds and provenance entries. */
static msgpack_object merged_header(moe_reader **in, int n, msgpack_zone *z) {
    uint32_t nk = 0, np = 0;
    size_t capk = 0, capp = 0; /* summed over inputs: may pass 2^32 */
    for (int i = 0; i < n; i++) {
        const msgpack_object *h = moe_reader_header(in[i]);
        const msgpack_object *k = moe_map_get(h, "kinds"), *p = moe_map_get(h, "provenance");
        capk += k ? k->via.array.size : 0;
        capp += p && p->type == MSGPACK_OBJECT_ARRAY ? p->via.array.size : 0;
    }
    msgpack_object *kinds = msgpack_zone_malloc(z, (capk + 1) * sizeof *kinds);
    msgpack_object *prov = msgpack_zone_malloc(z, (capp + 1) * sizeof *prov);
    for (int i = 0; i < n; i++) {
        const msgpack_object *h = moe_reader_header(in[i]);
        const msgpack_object *k = moe_map_get(h, "kinds"), *p = moe_map_get(h, "provenance");
        for (uint32_t j = 0; k && j < k->via.array.size; j++)
            if (!contains(kinds, nk, &k->via.array.ptr[j])) kinds[nk++] = k->via.array.ptr[j];
        for (uint32_t j = 0; p && p->type == MSGPACK_OBJECT_ARRAY && j < p->via.array.size; j++)
            if (!contains(prov, np, &p->via.array.ptr[j])) prov[np++] = p->via.array.ptr[j];
    }
    msgpack_object_kv *kv = msgpack_zone_malloc(z, 2 * sizeof *kv);
    kv[0].key = (msgpack_object){.type = MSGPACK_OBJECT_STR, .via.str = {5, "kinds"}};
    kv[0].val = (msgpack_object){.type = MSGPACK_OBJECT_ARRAY, .via.array = {nk, kinds}};
    kv[1].key = (msgpack_object){.type = MSGPACK_OBJECT_STR, .via.str = {10, "provenance"}};
    kv[1].val = (msgpack_object){.type = MSGPACK_OBJECT_ARRAY, .via.array = {np, prov}};
    return (msgpack_object){.type = MSGPACK_OBJECT_MAP, .via.map = {2, kv}};
}

/* Models must agree across inputs: check each input against the first
 * fingerprint found. */
static int check_models(moe_reader **in, int n, int force) {
    const char *fp = NULL;
    char *owned = NULL;
    for (int i = 0; i < n && !fp; i++) {
        const msgpack_object *p = moe_map_get(moe_reader_header(in[i]), "provenance");
        for (uint32_t j = 0; p && j < p->via.array.size && !fp; j++) {
            const msgpack_object *m = moe_map_get(&p->via.array.ptr[j], "model");
            if (m && m->type == MSGPACK_OBJECT_STR) fp = owned = moe_obj_strdup(m);
        }
    }
    int rc = 0;
    for (int i = 0; fp && i < n && rc == 0; i++) rc = moe_reader_check_model(in[i], fp, force);
    free(owned);
    return rc;
}

/* Records already written, for skipping exact duplicates: a hash set of the
 * SHA-256 of each record's packed bytes.  Only 32 bytes per record are kept,
 * so merging shards of a large dump stays linear in time and small in memory
 * (a deep copy of every record once made a 1 GiB record cost 3 GB). */
typedef struct {
    unsigned char (*digest)[32]; /* open addressing, cap a power of two */
    unsigned char *used;
    size_t n, cap;
} seen_set;

static int hash_sink(void *data, const char *buf, size_t len) {
    moe_sha256_update(data, buf, len);
    return 0;
}

static size_t slot_of(const unsigned char d[32], size_t cap) {
    uint64_t h;
    memcpy(&h, d, sizeof h);
    return (size_t)h & (cap - 1);
}

static void seen_insert(seen_set *s, const unsigned char d[32]) {
    size_t i = slot_of(d, s->cap);
    while (s->used[i]) i = (i + 1) & (s->cap - 1);
    s->used[i] = 1;
    memcpy(s->digest[i], d, 32);
}

static int seen_before(seen_set *s, const msgpack_object *rec) {
    moe_sha256 sha;
    moe_sha256_init(&sha);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sha, hash_sink);
    msgpack_pack_object(&pk, *rec);
    unsigned char d[32];
    moe_sha256_final(&sha, d);
    for (size_t i = s->cap ? slot_of(d, s->cap) : 0; s->cap && s->used[i]; i = (i + 1) & (s->cap - 1))
        if (memcmp(s->digest[i], d, 32) == 0) return 1;
    if (2 * (s->n + 1) > s->cap) { /* keep the load under 1/2 */
        seen_set old = *s;
        s->cap = old.cap ? 2 * old.cap : 64;
        s->digest = moe_calloc(s->cap, sizeof *s->digest);
        s->used = moe_calloc(s->cap, 1);
        for (size_t i = 0; i < old.cap; i++)
            if (old.used[i]) seen_insert(s, old.digest[i]);
        free(old.digest);
        free(old.used);
    }
    seen_insert(s, d);
    s->n++;
    return 0;
}

int main(int argc, char **argv) {
    moe_cli_init("moe-merge", help, MOE_CLI_TAKES_FORCE | MOE_CLI_TAKES_NO_PROVENANCE, argc, argv);
    static const struct option opts[] = {{"output", required_argument, 0, 'o'}, MOE_CLI_COMMON_OPTIONS, {0, 0, 0, 0}};
    const char *out = "-";
    int c;
    while ((c = getopt_long(argc, argv, ":o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        if (c == 'o') out = optarg;
        else moe_cli_usage("unknown option");
    }
    int n = argc - optind;
    if (n < 1) moe_cli_usage("no input streams");
    moe_reader **in = moe_calloc((size_t)n, sizeof *in);
    for (int i = 0; i < n; i++)
        if (!(in[i] = moe_reader_open(argv[optind + i]))) moe_cli_fail();
    if (check_models(in, n, moe_cli.force) < 0) moe_cli_fail();

    msgpack_zone z;
    msgpack_zone_init(&z, 4096);
    msgpack_object hdr = merged_header(in, n, &z);
    moe_provenance prov = {.tool = "moe-merge", .argc = argc, .argv = argv};
    moe_writer *w = moe_writer_open(out, &hdr, &prov, moe_cli.no_provenance);
    if (!w) moe_cli_fail();
    seen_set seen = {0};
    for (int i = 0; i < n; i++) {
        const msgpack_object *rec;
        int rc;
        while ((rc = moe_reader_next(in[i], &rec)) > 0)
            if (!seen_before(&seen, rec) && moe_writer_copy(w, rec) < 0) break;
        if (rc < 0) {
            moe_writer_abort(w);
            moe_cli_fail();
        }
        moe_reader_close(in[i]);
    }
    if (moe_writer_close(w) < 0) moe_cli_fail();
    msgpack_zone_destroy(&z);
    free(seen.digest);
    free(seen.used);
    free(in);
    return 0;
}
