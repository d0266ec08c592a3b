/*
 * shmcounter/_slots.h: what the core C module (shmcounter/_atomic.c) shares with
 * the C steps of a layer above it (shmcounter/memcg/_legacy.c): the Slots object,
 * its bounds checks and ArenaCorrupt, the argument parsing of the fused steps, the
 * slot lock, and the writer row and stock slot layouts (see segment.py).
 *
 * Every atomic here is __ATOMIC_SEQ_CST: each one is a full barrier, which is what
 * the ordering arguments of the Python layers rely on.
 */
#ifndef SHMCOUNTER_SLOTS_H
#define SHMCOUNTER_SLOTS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>

/* page_counter record: 24 int64 words, three 64-byte lines (see segment.py). */
#define PC_USAGE 0              /* line A: usage alone                        */
#define PC_WATERMARK 8          /* line B: written by charges                 */
#define PC_FAILCNT 9
#define PC_EMIN 10
#define PC_ELOW 11
#define PC_MIN_USAGE 12
#define PC_LOW_USAGE 13
#define PC_CHILDREN_MIN_USAGE 14
#define PC_CHILDREN_LOW_USAGE 15
#define PC_MAX 16               /* line C: read-mostly                        */
#define PC_MIN 17
#define PC_LOW 18
#define PC_HIGH 19
#define PC_PARENT 20
#define PC_BATCH 21
#define PC_STOCK_ID 22
#define PC_FLAGS 23
#define PC_WORDS 24
#define PC_FLAG_UNCHARGE_TO_STOCK 1
#define PC_FLAG_LOCKLESS 2      /* v4: the stock slot is one atomic word, no lock */
#define PC_FLAG_CAP 4           /* v4 with the E14 cap: a deposit above batch drains the word */

/* stock slot: 2 int64 words, [nr_pages, lock]; lock holds the holder's pid or 0. */
#define STOCK_NR 0
#define STOCK_LOCK 1
#define STOCK_WORDS 2
/*
 * A lockless (v4) stock slot reuses the two words as [word, last]: word =
 * seq << V4_PAGES_BITS | pages, changed only by CAS (the CPU's hit and deposit, a
 * drain from any process); seq counts the drains that took pages, modulo
 * V4_SEQ_MOD (the word stays >= 0); last is the word the latest such drain took
 * (see _op.h, "The lockless stock").
 */
#define STOCK_LAST 1
#define V4_PAGES_BITS 34
#define V4_PAGES_MASK ((1LL << V4_PAGES_BITS) - 1)
#define V4_SEQ_MOD (1LL << 29)

/*
 * writer row: 32 int64 words, four 64-byte lines (see segment.py). Every process
 * that changes a usage owns one row: CPU k owns row k.
 */
#define R_PID 0                 /* line 0: owner pid; drains done (CPU rows)    */
#define R_DONE_SEQ 1
#define R_STOCK_BLOCK 2         /* CPU rows: first slot of the CPU's stock block */
#define R_START 3               /* the owner's start time: a reused pid is not it */
#define R_REQ_SEQ 8             /* line 1: drain tickets, taken by requesters   */
#define R_IN_OP 16              /* lines 2-3: the owner's op and intent record  */
#define R_OP 17
#define R_COUNTER 18
#define R_STOCK_SLOT 19
#define R_STOCK_BEFORE 20
#define R_DEPTH 21
#define R_BASE 22               /* contrib of each level when the op began      */
#define R_WALKS 4               /* line 0: walks up the hierarchy (a statistic) */
#define R_FWD_LEVELS 5          /* line 0: the op's forward plan (op_forward):  */
#define R_FWD_DELTA 6           /*   0 levels: roll back; else roll forward to  */
#define R_STOCK_AFTER 7         /*   delta at each of the first levels, and the */
                                /*   stock word to stock_after                  */
#define MAX_DEPTH 10
#define ROW_WORDS 32

/* What a stock hit step returns (exported as module constants of these names). */
enum {
    CONSUME_NO_STOCK = -2,      /* the counter has no stock                     */
    CONSUME_BUSY = -1,          /* the slot lock is held, or an op of this CPU  */
    CONSUME_MISS = 0,           /* the slot holds fewer pages than asked        */
    CONSUME_HIT = 1,            /* the pages were taken from the slot           */
};

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
/*
 * A release store: every load and store before it is visible before it (a plain
 * mov on x86, where a seq_cst store is an xchg). For the stores whose only readers
 * run after a lock release, an op's end, or the writer's death: the contrib words,
 * the intent record but in_op, a stock slot's nr_pages under its lock, unlocks.
 * in_op, the one side of a Dekker handshake, stays seq_cst (op_enter).
 */
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ADD_FETCH(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

static inline int
cas_strong(int64_t *p, int64_t expected, int64_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---- Slots: the buffer held once, 8-byte slot indexes -------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* valid while words != NULL */
    int64_t *words;
    Py_ssize_t nwords;
    /* Once released, every step raises released_type(released_msg) (release()'s
       arguments: the arena's "is closed" error), or ValueError without them. */
    PyObject *released_type;
    PyObject *released_msg;
    /*
     * The arena's sections, set once by set_layout (slot indexes and counts; see
     * segment.py): the fused steps check every index they derive from a word of
     * the segment against the section it must lie in, and raise ArenaCorrupt
     * naming the arena (name), the word and its value. name == NULL: a bare
     * buffer (tests), checked against its bounds only.
     */
    PyObject *name;
    int64_t rows, counters, max_counters, stocks, stock_block, ncpus, max_stocked;
    /*
     * The extension section, set by the C steps of a layer above the core (its
     * set_section; 0 words: none): ext_blocks blocks of ext_words words from slot
     * ext_first. The core reads it for one thing only: words [ext_lo, ext_hi) of
     * each block may be named by an op's intent record as its stock slot, and are
     * rolled back with the op. The layer's own steps interpret the rest.
     */
    int64_t ext_first, ext_blocks, ext_words, ext_lo, ext_hi;
    /*
     * This process, set by the Python layers (set_writer, set_cpu) and reset in a
     * forked child: the first slot of its writer row (-1 until it claims one) and
     * of the row's contrib words; as a CPU, the first slot of its stock block and
     * its lock token (its pid), else -1 and 0. A CPU's writer row is its CPU row.
     * The ops of a Counter (_counter.c) read them instead of taking arguments.
     */
    int64_t row, contrib, cpu_block, owner;
    int64_t stop;               /* the stop_machine word (set_layout)             */
} SlotsObject;

/*
 * The state of shmcounter._atomic, which _legacy.c reaches through the Slots type
 * (PyType_GetModuleState(Py_TYPE(slots))): the types, ArenaCorrupt, the
 * (True, None) of a successful try_charge, and whether any Python hook is armed
 * (shmcounter.hooks: the ops then take their stepwise Python paths).
 */
typedef struct {
    PyObject *slots_type;       /* Slots, this module's heap type */
    PyObject *counter_type;     /* Counter (_counter.c) */
    PyObject *charge_or_type;   /* ChargeOr (_counter.c) */
    PyObject *arena_corrupt;    /* shmcounter.errors.ArenaCorrupt */
    PyObject *success;          /* (True, None) */
    int hooks_armed;
} atomic_state;

/* Bounds-checked pointer to slot i, spanning `span` words (a record or a slot). */
static inline int64_t *
word(SlotsObject *self, Py_ssize_t i, Py_ssize_t span)
{
    if (self->words == NULL) {
        if (self->released_type)
            PyErr_SetObject(self->released_type, self->released_msg);
        else
            PyErr_SetString(PyExc_ValueError, "Slots is released (the arena was closed)");
        return NULL;
    }
    if (i < 0 || span > self->nwords || i > self->nwords - span) {
        PyErr_Format(PyExc_IndexError, "slot %zd (+%zd) outside 0..%zd",
                     i, span, self->nwords);
        return NULL;
    }
    return self->words + i;
}

/*
 * Raise arena_corrupt(arena name, field, value, expected) (shmcounter.errors.
 * ArenaCorrupt, from the calling module's state): the word `field` (a printf-style
 * format) read from the segment holds the impossible `value`. Returns NULL, for
 * `return corrupt(...)`.
 */
static inline PyObject *
corrupt(PyObject *arena_corrupt, SlotsObject *self, long long value, const char *expected,
        const char *field, ...)
{
    va_list ap;
    va_start(ap, field);
    PyObject *f = PyUnicode_FromFormatV(field, ap);
    va_end(ap);
    if (!f)
        return NULL;
    PyObject *exc = PyObject_CallFunction(arena_corrupt, "ONLs",
                                          self->name ? self->name : Py_None, f, value,
                                          expected);
    if (exc) {
        PyErr_SetObject(arena_corrupt, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/*
 * Parse `want` int arguments of a METH_FASTCALL call into out[]. Public API only
 * (PyLong_AsLongLong), so the modules build on every CPython >= 3.11.
 */
static inline int
parse_ints(const char *name, PyObject *const *args, Py_ssize_t nargs,
           Py_ssize_t want, long long *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)",
                     name, want, nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < want; k++) {
        out[k] = PyLong_AsLongLong(args[k]);
        if (out[k] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* ---- the slot lock: [x, lock], taken by one CPU's contexts ---------------- */

static inline int
slot_trylock(int64_t *s, int64_t owner)
{
    return cas_strong(&s[STOCK_LOCK], 0, owner);
}

static inline void
slot_unlock(int64_t *s)
{
    STORE_REL(&s[STOCK_LOCK], 0);
}

#endif /* SHMCOUNTER_SLOTS_H */
