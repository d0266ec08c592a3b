/*
 * shmcounter.memcg._legacy: the C steps of the old per-CPU charge cache,
 * memcg_stock_pcp (memcg/legacy.py), each one C call as the core's stock steps
 * are. The memcg layer's own module: the core (shmcounter/_atomic.c) knows
 * nothing of the legacy block below. It shares the Slots object, its bounds
 * checks, the slot lock and the writer row layout through shmcounter/_slots.h;
 * every function takes a Slots object of shmcounter._atomic as its first argument
 * (a TypeError otherwise).
 *
 * The legacy section: one block of MC_WORDS words per CPU, from the slot given to
 * set_section, which also tells the core (the extension section of _slots.h) that
 * an op may name a block's slot words, so that op_begin takes them and op_abort
 * rolls them back.
 *
 * Multi-phase init (PEP 489); the module state holds the Slots type and
 * shmcounter.errors.ArenaCorrupt.
 */
#include "../_slots.h"

/*
 * legacy memcg_stock_pcp block of one CPU: 16 int64 words (see memcg/legacy.py).
 * The lock sits where a stock slot's does, so the slot lock of _slots.h applies
 * to it. Slot word: bits 0-7 nr_pages (the kernel's u8), bits 8-31 the cached
 * cgroup's tag (its memory counter + 1; 0 = empty); bits 32-63 a second such half,
 * pages taken out of the slot and not yet uncharged (legacy.py).
 */
#define MC_FLUSHING 0
#define MC_LOCK STOCK_LOCK
#define MC_DRAIN_IDX 2
#define MC_SLOTS 3
#define NR_MEMCG_STOCK 7
#define MC_EVICTIONS 10         /* this CPU's event counts, written by it only  */
#define MC_OVERFLOWS 11
#define MC_FLUSHES 12
#define MC_WORDS 16
#define MEMCG_CHARGE_BATCH 64

/* What refill does (the first item of its result). */
enum { LEGACY_DEPOSITED, LEGACY_OVERFLOW, LEGACY_EVICTED, LEGACY_BYPASS };

/* The module state. */
typedef struct {
    PyObject *slots_type;       /* shmcounter._atomic.Slots, fetched at exec */
    PyObject *arena_corrupt;    /* shmcounter.errors.ArenaCorrupt */
} legacy_state;

/*
 * The Slots object of a call and its `want` int arguments after it, into *self and
 * out[]. TypeError for a first argument that is not a Slots of shmcounter._atomic.
 */
static int
legacy_args(legacy_state *st, const char *name, PyObject *const *args, Py_ssize_t nargs,
            Py_ssize_t want, SlotsObject **self, long long *out)
{
    if (nargs != want + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)",
                     name, want + 1, nargs);
        return -1;
    }
    if (!PyObject_TypeCheck(args[0], (PyTypeObject *)st->slots_type)) {
        PyErr_Format(PyExc_TypeError, "%s() argument 1 must be shmcounter._atomic.Slots, "
                     "not %.200s", name, Py_TYPE(args[0])->tp_name);
        return -1;
    }
    *self = (SlotsObject *)args[0];
    return parse_ints(name, args + 1, nargs - 1, want, out);
}

#define LEGACY_ARGS(name, want) \
    legacy_state *st = PyModule_GetState(module); \
    SlotsObject *self; \
    long long a[want]; \
    if (legacy_args(st, name, args, nargs, want, &self, a) < 0) return NULL

/* Is b the first word of a CPU's legacy block? Without a section: any word of a
 * bare buffer (tests), none of an arena's. */
static int
is_legacy_block(SlotsObject *self, int64_t b)
{
    if (self->ext_words != MC_WORDS)
        return self->name == NULL;
    return b >= self->ext_first && b < self->ext_first + self->ext_blocks * MC_WORDS
        && (b - self->ext_first) % MC_WORDS == 0;
}

/* Pointer to the legacy block at b, or NULL with ArenaCorrupt (b is a word of the
 * segment, or derived from one), or ValueError for an arena without the section. */
static int64_t *
legacy_block(legacy_state *st, SlotsObject *self, int64_t b)
{
    if (!is_legacy_block(self, b)) {
        if (self->ext_words != MC_WORDS) {
            PyErr_SetString(PyExc_ValueError, "this Slots has no legacy section: "
                            "call shmcounter.memcg._legacy.set_section first");
            return NULL;
        }
        return (int64_t *)corrupt(st->arena_corrupt, self, b,
                                  "not the start of a CPU's legacy block",
                                  "legacy block index");
    }
    return word(self, b, MC_WORDS);
}

/*
 * set_section(slots, first, count): the legacy section is `count` per-CPU blocks of
 * MC_WORDS words from slot `first` (memcg/section.py's per-CPU blocks). The steps below check
 * every block index against it, and the core's op steps accept the slot words of
 * its blocks as an op's stock slot. By Arena.__init__, before any other step.
 */
static PyObject *
legacy_set_section(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("set_section", 2);
    int64_t first = a[0], count = a[1];
    if (!word(self, 0, 0))
        return NULL;
    if (first < 0 || count < 0 || count > (self->nwords - first) / MC_WORDS) {
        PyErr_Format(PyExc_ValueError, "set_section: %lld blocks of %d words from slot "
                     "%lld do not fit in %zd words", (long long)count, MC_WORDS,
                     (long long)first, self->nwords);
        return NULL;
    }
    self->ext_first = first;
    self->ext_blocks = count;
    self->ext_lo = MC_SLOTS;
    self->ext_hi = MC_SLOTS + NR_MEMCG_STOCK;
    self->ext_words = MC_WORDS;
    Py_RETURN_NONE;
}

/*
 * consume(slots, row, block, tag, nr) -> CONSUME_HIT, CONSUME_MISS or CONSUME_BUSY:
 * consume_stock of the old per-CPU cache (docs/kernel-semantics.md §memcg stock) in
 * one call. Refuses nr > 64 (a miss); trylock the CPU's block; find the slot cached
 * for tag; take nr if it holds that many. Only the owning CPU calls it; busy while
 * an op of this CPU is in progress, as for Slots.stock_consume.
 */
static PyObject *
legacy_consume(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("consume", 4);
    int64_t tag = a[2], nr = a[3];
    int64_t *row = word(self, a[0], ROW_WORDS), *b = row ? legacy_block(st, self, a[1]) : NULL;
    if (!row || !b)
        return NULL;
    if (nr > MEMCG_CHARGE_BATCH)
        return PyLong_FromLong(CONSUME_MISS);
    if (LOAD(&row[R_OP]) || !slot_trylock(b, LOAD(&row[R_PID])))
        return PyLong_FromLong(CONSUME_BUSY);
    int result = CONSUME_MISS;
    for (int i = 0; i < NR_MEMCG_STOCK; i++) {
        int64_t w = LOAD(&b[MC_SLOTS + i]);
        if (((w >> 8) & 0xffffff) == tag) {
            if ((w & 0xff) >= nr) {
                STORE(&b[MC_SLOTS + i], w - nr);
                result = CONSUME_HIT;
            }
            break;
        }
    }
    slot_unlock(b);
    return PyLong_FromLong(result);
}

/*
 * refill(slots, row, block, tag, nr, victim) -> (action, slot index, pages):
 * refill_stock of the old per-CPU cache (docs/kernel-semantics.md §memcg stock) in
 * one call, inside an op of row (the CPU's writer row) on the path of the cgroup
 * tagged tag, whose nr pages are charged. Under the CPU's trylock: the slot cached
 * for tag gets the pages, and is emptied whole if that takes it past 64
 * (LEGACY_OVERFLOW: the caller uncharges `pages`); else the first slot with an
 * empty cached half takes them (LEGACY_DEPOSITED); else the victim slot (victim, or
 * the round-robin index if victim < 0) is evicted: its cached half moves to its
 * pending half in the same store (LEGACY_EVICTED: the caller uncharges it in an op
 * of its own). LEGACY_BYPASS (nr > 64, lock busy, or a victim whose pending half is
 * taken; slot index -1): the caller uncharges the nr pages.
 * Before the slot word changes, the op's intent record names it and its value
 * (R_STOCK_BEFORE, then R_STOCK_SLOT), so a kill rolls the word back with the op.
 */
static PyObject *
legacy_refill(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("refill", 5);
    int64_t tag = a[2], nr = a[3], victim = a[4];
    int64_t *row = word(self, a[0], ROW_WORDS), *b = row ? legacy_block(st, self, a[1]) : NULL;
    if (!row || !b)
        return NULL;
    if (victim >= NR_MEMCG_STOCK) {
        PyErr_Format(PyExc_ValueError, "victim must be < %d, got %lld",
                     NR_MEMCG_STOCK, (long long)victim);
        return NULL;
    }
    if (nr > MEMCG_CHARGE_BATCH || !slot_trylock(b, LOAD(&row[R_PID])))
        return Py_BuildValue("(iiL)", LEGACY_BYPASS, -1, (long long)0);
    const int64_t cur = 0xffffffffLL;
    int action = LEGACY_DEPOSITED, i, empty = -1;
    int64_t pages = 0, w = 0;
    for (i = 0; i < NR_MEMCG_STOCK; i++) {
        w = LOAD(&b[MC_SLOTS + i]);
        if (((w >> 8) & 0xffffff) == tag)
            break;
        if (empty < 0 && (w & cur) == 0)
            empty = i;
    }
    int64_t next;
    if (i < NR_MEMCG_STOCK) {
        pages = (w & 0xff) + nr;
        if (pages > MEMCG_CHARGE_BATCH) {
            action = LEGACY_OVERFLOW;
            next = w & ~cur;
        } else {
            next = w + nr;
        }
    } else if (empty >= 0) {
        i = empty;
        w = LOAD(&b[MC_SLOTS + i]);
        next = (w & ~cur) | tag << 8 | nr;
    } else {
        if (victim < 0) {
            victim = LOAD(&b[MC_DRAIN_IDX]);
            if (victim < 0 || victim >= NR_MEMCG_STOCK) {
                slot_unlock(b);
                return corrupt(st->arena_corrupt, self, victim, "not a slot number in [0, 7)",
                               "memcg_cpu %lld's drain_idx",
                               (long long)((a[1] - self->ext_first) / MC_WORDS));
            }
            STORE(&b[MC_DRAIN_IDX], (victim + 1) % NR_MEMCG_STOCK);
        }
        i = (int)victim;
        w = LOAD(&b[MC_SLOTS + i]);
        if (w & ~cur) {
            slot_unlock(b);
            return Py_BuildValue("(iiL)", LEGACY_BYPASS, -1, (long long)0);
        }
        action = LEGACY_EVICTED;
        next = w << 32 | tag << 8 | nr;
    }
    STORE(&row[R_STOCK_BEFORE], w);
    STORE(&row[R_STOCK_SLOT], a[1] + MC_SLOTS + i);
    STORE(&b[MC_SLOTS + i], next);
    if (action == LEGACY_OVERFLOW)
        ADD_FETCH(&b[MC_OVERFLOWS], 1);
    else if (action == LEGACY_EVICTED)
        ADD_FETCH(&b[MC_EVICTIONS], 1);
    slot_unlock(b);
    return Py_BuildValue("(iiL)", action, i, (long long)pages);
}

/*
 * trylock(slots, block, owner) -> bool; unlock(slots, block). The lock word of the
 * legacy block at `block` alone: the blocking local_lock of the drain paths
 * (legacy.py) is built on them.
 */
static PyObject *
legacy_trylock(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("trylock", 2);
    int64_t *b = legacy_block(st, self, a[0]);
    if (!b)
        return NULL;
    return PyBool_FromLong(slot_trylock(b, a[1]));
}

static PyObject *
legacy_unlock(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("unlock", 1);
    int64_t *b = legacy_block(st, self, a[0]);
    if (!b)
        return NULL;
    slot_unlock(b);
    Py_RETURN_NONE;
}

/* ---- the module ---------------------------------------------------------------- */

PyDoc_STRVAR(set_section_doc,
"set_section(slots, first, count, /)\n--\n\n"
"The legacy section of Slots `slots`: `count` per-CPU blocks of MC_WORDS words from\n"
"slot `first`. The steps of this module check every block index against it, and\n"
"the core's op steps accept its slot words as an op's stock slot. Set by\n"
"Arena.__init__, before any other step; ValueError if it does not fit in the\n"
"buffer.");
PyDoc_STRVAR(consume_doc,
"consume(slots, row, block, tag, nr, /)\n--\n\n"
"consume_stock of the old per-CPU cache, on this CPU (row: its writer row; block:\n"
"its legacy block): return CONSUME_HIT (nr pages taken from the slot cached for\n"
"cgroup tag, under the block's lock), CONSUME_MISS (no such slot, fewer pages, or\n"
"nr > MEMCG_CHARGE_BATCH) or CONSUME_BUSY (the lock is held, or an op of this CPU\n"
"is in progress). Only the owning CPU calls it.");
PyDoc_STRVAR(refill_doc,
"refill(slots, row, block, tag, nr, victim, /)\n--\n\n"
"refill_stock of the old per-CPU cache, inside an op of row on cgroup tag's path\n"
"whose nr pages are charged, under the block's lock; return (action, slot, pages):\n"
"LEGACY_DEPOSITED (the slot took them), LEGACY_OVERFLOW (the slot went past 64\n"
"and was emptied: uncharge `pages`), LEGACY_EVICTED (the victim's pages moved to\n"
"its pending half: uncharge them in an op of their own) or LEGACY_BYPASS (slot -1:\n"
"uncharge the nr pages). victim: the slot to evict, or -1 for round-robin. The op's\n"
"intent record names the slot word before it changes.");
PyDoc_STRVAR(trylock_doc,
"trylock(slots, block, owner, /)\n--\n\n"
"Take the lock of the legacy block at slot `block` for owner if it is free; return\n"
"whether it was taken.");
PyDoc_STRVAR(unlock_doc,
"unlock(slots, block, /)\n--\n\nRelease the lock of the legacy block at slot `block` "
"(its holder only).");

#define FAST(name) \
    {#name, (PyCFunction)(void (*)(void))legacy_##name, METH_FASTCALL, name##_doc}

static PyMethodDef legacy_methods[] = {
    FAST(set_section), FAST(consume), FAST(refill), FAST(trylock), FAST(unlock),
    {NULL}
};

/* Module exec (PEP 489): fill the state, then the module's names. A failure leaves
 * the state to legacy_clear, and the module is dropped. */
static int
legacy_exec(PyObject *m)
{
    legacy_state *st = PyModule_GetState(m);
    PyObject *mod = PyImport_ImportModule("shmcounter.errors");
    if (!mod)
        return -1;
    st->arena_corrupt = PyObject_GetAttrString(mod, "ArenaCorrupt");
    Py_DECREF(mod);
    if (!st->arena_corrupt)
        return -1;
    mod = PyImport_ImportModule("shmcounter._atomic");
    if (!mod)
        return -1;
    st->slots_type = PyObject_GetAttrString(mod, "Slots");
    Py_DECREF(mod);
    if (!st->slots_type)
        return -1;
    if (!PyType_Check(st->slots_type)) {
        PyErr_SetString(PyExc_TypeError, "shmcounter._atomic.Slots is not a type");
        return -1;
    }
#define CONST(n) if (PyModule_AddIntConstant(m, #n, n) < 0) return -1
    CONST(MC_FLUSHING); CONST(MC_LOCK); CONST(MC_DRAIN_IDX); CONST(MC_SLOTS);
    CONST(NR_MEMCG_STOCK); CONST(MC_EVICTIONS); CONST(MC_OVERFLOWS);
    CONST(MC_FLUSHES); CONST(MC_WORDS); CONST(MEMCG_CHARGE_BATCH);
    CONST(LEGACY_DEPOSITED); CONST(LEGACY_OVERFLOW); CONST(LEGACY_EVICTED);
    CONST(LEGACY_BYPASS);
    CONST(CONSUME_HIT); CONST(CONSUME_MISS); CONST(CONSUME_BUSY);
#undef CONST
    return 0;
}

static int
legacy_traverse(PyObject *m, visitproc visit, void *arg)
{
    legacy_state *st = PyModule_GetState(m);
    Py_VISIT(st->slots_type);
    Py_VISIT(st->arena_corrupt);
    return 0;
}

static int
legacy_clear(PyObject *m)
{
    legacy_state *st = PyModule_GetState(m);
    Py_CLEAR(st->slots_type);
    Py_CLEAR(st->arena_corrupt);
    return 0;
}

static void
legacy_free(void *m)
{
    legacy_clear((PyObject *)m);
}

/* No Py_mod_multiple_interpreters slot: the default stands (see _atomic.c). */
static PyModuleDef_Slot legacy_slots[] = {
    {Py_mod_exec, legacy_exec},
    {0, NULL},
};

static struct PyModuleDef legacy_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmcounter.memcg._legacy",
    .m_doc = "The C steps of the old per-CPU memcg charge cache (memcg/legacy.py), on a "
             "shmcounter._atomic.Slots.",
    .m_size = sizeof(legacy_state),
    .m_methods = legacy_methods,
    .m_slots = legacy_slots,
    .m_traverse = legacy_traverse,
    .m_clear = legacy_clear,
    .m_free = legacy_free,
};

PyMODINIT_FUNC
PyInit__legacy(void)
{
    return PyModuleDef_Init(&legacy_module);
}
