/* moe-merge - join moe-streams into one: records of each input in order,
 * kinds and provenance united.  Used to join shards of work that was spread
 * over machines (e.g. moe-expert-rank --layers on disjoint layer sets). */
#include "cli.h"
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
    uint32_t nk = 0, np = 0, capk = 0, capp = 0;
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

/* Records already written, for skipping exact duplicates: a hash set of deep
 * copies, so that merging shards of a large dump stays linear in its size. */
typedef struct {
    msgpack_zone zone;
    msgpack_object *seen; /* open addressing, cap a power of two */
    uint64_t *hash;       /* 0 = empty slot */
    size_t n, cap;
} seen_set;

/* FNV-1a over a value's type and contents, consistent with
 * msgpack_object_equal: equal objects hash alike (0.0 and -0.0 included). */
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
static uint64_t object_hash(uint64_t h, const msgpack_object *o) {
    h = fnv(h, &o->type, sizeof o->type);
    switch (o->type) {
    case MSGPACK_OBJECT_BOOLEAN: return fnv(h, &o->via.boolean, sizeof o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return fnv(h, &o->via.u64, sizeof o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return fnv(h, &o->via.i64, sizeof o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: {
        double d = o->via.f64 == 0 ? 0.0 : o->via.f64;
        return fnv(h, &d, sizeof d);
    }
    case MSGPACK_OBJECT_STR: return fnv(h, o->via.str.ptr, o->via.str.size);
    case MSGPACK_OBJECT_BIN: return fnv(h, o->via.bin.ptr, o->via.bin.size);
    case MSGPACK_OBJECT_EXT:
        h = fnv(h, &o->via.ext.type, sizeof o->via.ext.type);
        return fnv(h, o->via.ext.ptr, o->via.ext.size);
    case MSGPACK_OBJECT_ARRAY:
        for (uint32_t i = 0; i < o->via.array.size; i++) h = object_hash(h, &o->via.array.ptr[i]);
        return fnv(h, &o->via.array.size, sizeof o->via.array.size);
    case MSGPACK_OBJECT_MAP:
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            h = object_hash(h, &o->via.map.ptr[i].key);
            h = object_hash(h, &o->via.map.ptr[i].val);
        }
        return fnv(h, &o->via.map.size, sizeof o->via.map.size);
    default: return h;
    }
}

static void seen_insert(seen_set *s, const msgpack_object *o, uint64_t h) {
    size_t i = h & (s->cap - 1);
    while (s->hash[i]) i = (i + 1) & (s->cap - 1);
    s->hash[i] = h;
    s->seen[i] = *o;
}

static int seen_before(seen_set *s, const msgpack_object *rec) {
    uint64_t h = object_hash(0xcbf29ce484222325ull, rec) | 1; /* never 0 */
    for (size_t i = s->cap ? h & (s->cap - 1) : 0; s->cap && s->hash[i]; i = (i + 1) & (s->cap - 1))
        if (s->hash[i] == h && msgpack_object_equal(s->seen[i], *rec)) return 1;
    if (2 * (s->n + 1) > s->cap) { /* keep the load under 1/2 */
        seen_set old = *s;
        s->cap = old.cap ? 2 * old.cap : 64;
        s->seen = moe_calloc(s->cap, sizeof *s->seen);
        s->hash = moe_calloc(s->cap, sizeof *s->hash);
        for (size_t i = 0; i < old.cap; i++)
            if (old.hash[i]) seen_insert(s, &old.seen[i], old.hash[i]);
        free(old.seen);
        free(old.hash);
    }
    /* deep copy into our zone: the reader's record memory is reused */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_object(&pk, *rec);
    char *copy = msgpack_zone_malloc(&s->zone, sb.size);
    memcpy(copy, sb.data, sb.size);
    size_t off = 0;
    msgpack_object o;
    msgpack_unpack(copy, sb.size, &off, &s->zone, &o);
    msgpack_sbuffer_destroy(&sb);
    seen_insert(s, &o, h);
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
    msgpack_zone_init(&seen.zone, 1 << 16);
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
    msgpack_zone_destroy(&seen.zone);
    msgpack_zone_destroy(&z);
    free(seen.seen);
    free(seen.hash);
    free(in);
    return 0;
}
