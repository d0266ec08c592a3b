/*
 * shmcounter.memcg._legacy: the C steps of the old per-CPU charge cache,
 * memcg_stock_pcp (memcg/legacy.py), each one C call as the core's stock steps
 * are. The memcg layer's own module: the core (shmcounter/_atomic.c) knows
 * nothing of the legacy block below. It shares the Slots object, its bounds
 * checks, the slot lock and the writer row layout through shmcounter/_slots.h;
 * every step takes a Slots object of shmcounter._atomic as its first argument
 * (a TypeError otherwise); cgroup_ops takes a Counter of shmcounter._atomic, whose
 * Slots it uses.
 *
 * The legacy section: one block of MC_WORDS words per CPU, from the slot given to
 * set_section, which also tells the core (the extension section of _slots.h) that
 * an op may name a block's slot words, so that op_begin takes them and op_abort
 * rolls them back.
 *
 * CgroupOps: a legacy cgroup's try_charge and uncharge, each one C call from the
 * caller's frame with its ops inside it (memcg/legacy_design.py binds them), on the
 * op kernel of the core (shmcounter/_op.h) and the memory counter's cached path.
 * Its ops write their intent records exactly as the stepwise path's do
 * (legacy.py), so stop_machine.py repairs both alike. The C call holds the GIL
 * from its first store to its last: no signal handler and no other thread of this
 * process runs inside it.
 *
 * Multi-phase init (PEP 489); the module state holds the Slots type,
 * shmcounter.errors.ArenaCorrupt, the CgroupOps type and this process's random
 * eviction generator.
 */
#include "../_op.h"
#include <structmember.h>
#include <time.h>

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
#define HALF 32                 /* bits of one half of a slot word              */
#define NR_MASK 0xffLL
#define TAG_MASK 0xffffffLL
#define CUR_MASK 0xffffffffLL

/* What refill does (the first item of its result). */
enum { LEGACY_DEPOSITED, LEGACY_OVERFLOW, LEGACY_EVICTED, LEGACY_BYPASS };

/* The module state. */
typedef struct {
    PyObject *slots_type;       /* shmcounter._atomic.Slots, fetched at exec */
    PyObject *arena_corrupt;    /* shmcounter.errors.ArenaCorrupt */
    PyObject *ops_type;         /* CgroupOps, this module's heap type */
    PyObject *uncharge_name;    /* "uncharge", interned */
    /* The random eviction order's generator (xorshift64*), seeded for each CPU
     * process that draws from it: `seeded_for` is the lock token (pid) it was
     * seeded for, so a forked child never repeats its parent's draws. */
    uint64_t rng;
    int64_t seeded_for;
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
 * consume_stock of the old per-CPU cache (docs/kernel-semantics.md §memcg stock):
 * refuse nr > 64 (a miss); trylock the CPU's block b with token `owner`; find the
 * slot cached for tag; take nr if it holds that many. CONSUME_HIT, CONSUME_MISS or
 * CONSUME_BUSY (the lock is held, or an op of this CPU is in progress: writer row
 * `row`'s op flag; as for Slots.stock_consume). Only the owning CPU calls it.
 */
static int
consume_slots(int64_t *row, int64_t *b, int64_t tag, int64_t nr, int64_t owner)
{
    if (nr > MEMCG_CHARGE_BATCH)
        return CONSUME_MISS;
    if (LOAD(&row[R_OP]) || !slot_trylock(b, owner))
        return CONSUME_BUSY;
    int result = CONSUME_MISS;
    for (int i = 0; i < NR_MEMCG_STOCK; i++) {
        int64_t w = LOAD(&b[MC_SLOTS + i]);
        if (((w >> 8) & TAG_MASK) == tag) {
            if ((w & NR_MASK) >= nr) {
                STORE(&b[MC_SLOTS + i], w - nr);
                result = CONSUME_HIT;
            }
            break;
        }
    }
    slot_unlock(b);
    return result;
}

/*
 * consume(slots, row, block, tag, nr) -> CONSUME_HIT, CONSUME_MISS or CONSUME_BUSY:
 * consume_slots in one call, for the stepwise path (legacy.py): row is the CPU's
 * writer row, whose pid is the lock token; block its legacy block.
 */
static PyObject *
legacy_consume(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    LEGACY_ARGS("consume", 4);
    int64_t *row = word(self, a[0], ROW_WORDS), *b = row ? legacy_block(st, self, a[1]) : NULL;
    if (!row || !b)
        return NULL;
    return PyLong_FromLong(consume_slots(row, b, a[2], a[3], LOAD(&row[R_PID])));
}

/*
 * refill_stock's slot step (docs/kernel-semantics.md §memcg stock), inside an op
 * of writer row `row` on the path of the cgroup tagged tag, whose nr pages are
 * charged; b is the legacy block at slot `block` of this CPU, whose lock it takes
 * with token `owner`. Under the lock: the slot cached for tag gets the pages, and
 * is emptied whole if that takes it past 64 (LEGACY_OVERFLOW: the caller uncharges
 * *pages); else the first slot with an empty cached half takes them
 * (LEGACY_DEPOSITED); else the victim slot (victim, or the round-robin index if
 * victim < 0) is evicted: its cached half moves to its pending half in the same
 * store (LEGACY_EVICTED: the caller uncharges it in an op of its own).
 * LEGACY_BYPASS (nr > 64, lock busy, or a victim whose pending half is taken; *slot
 * -1): the caller uncharges the nr pages.
 * Before the slot word changes, the op's intent record names it and its value
 * (R_STOCK_BEFORE, then R_STOCK_SLOT), so a kill rolls the word back with the op.
 * -1 with ArenaCorrupt (a drain_idx out of range): no word changed.
 */
static int
refill_slots(legacy_state *st, SlotsObject *self, int64_t *row, int64_t *b, int64_t block,
             int64_t tag, int64_t nr, int64_t victim, int64_t owner, int *slot, int64_t *pages)
{
    *slot = -1;
    *pages = 0;
    if (nr > MEMCG_CHARGE_BATCH || !slot_trylock(b, owner))
        return LEGACY_BYPASS;
    int action = LEGACY_DEPOSITED, i, empty = -1;
    int64_t w = 0;
    for (i = 0; i < NR_MEMCG_STOCK; i++) {
        w = LOAD(&b[MC_SLOTS + i]);
        if (((w >> 8) & TAG_MASK) == tag)
            break;
        if (empty < 0 && (w & CUR_MASK) == 0)
            empty = i;
    }
    int64_t next;
    if (i < NR_MEMCG_STOCK) {
        *pages = (w & NR_MASK) + nr;
        if (*pages > MEMCG_CHARGE_BATCH) {
            action = LEGACY_OVERFLOW;
            next = w & ~CUR_MASK;
        } else {
            next = w + nr;
        }
    } else if (empty >= 0) {
        i = empty;
        w = LOAD(&b[MC_SLOTS + i]);
        next = (w & ~CUR_MASK) | tag << 8 | nr;
    } else {
        if (victim < 0) {
            victim = LOAD(&b[MC_DRAIN_IDX]);
            if (victim < 0 || victim >= NR_MEMCG_STOCK) {
                slot_unlock(b);
                corrupt(st->arena_corrupt, self, victim, "not a slot number in [0, 7)",
                        "memcg_cpu %lld's drain_idx",
                        (long long)((block - self->ext_first) / MC_WORDS));
                return -1;
            }
            STORE(&b[MC_DRAIN_IDX], (victim + 1) % NR_MEMCG_STOCK);
        }
        i = (int)victim;
        w = LOAD(&b[MC_SLOTS + i]);
        if (w & ~CUR_MASK) {
            slot_unlock(b);
            return LEGACY_BYPASS;
        }
        action = LEGACY_EVICTED;
        next = w << HALF | tag << 8 | nr;
    }
    STORE(&row[R_STOCK_BEFORE], w);
    STORE(&row[R_STOCK_SLOT], block + MC_SLOTS + i);
    STORE(&b[MC_SLOTS + i], next);
    if (action == LEGACY_OVERFLOW)
        ADD_FETCH(&b[MC_OVERFLOWS], 1);
    else if (action == LEGACY_EVICTED)
        ADD_FETCH(&b[MC_EVICTIONS], 1);
    slot_unlock(b);
    *slot = i;
    return action;
}

/*
 * refill(slots, row, block, tag, nr, victim) -> (action, slot index, pages):
 * refill_slots in one call, for the stepwise path (legacy.py), inside an op of row
 * (the CPU's writer row, whose pid is the lock token).
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
    int slot;
    int64_t pages;
    int action = refill_slots(st, self, row, b, a[1], tag, nr, victim, LOAD(&row[R_PID]),
                              &slot, &pages);
    if (action < 0)
        return NULL;
    return Py_BuildValue("(iiL)", action, slot, (long long)pages);
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

/* ---- CgroupOps: a legacy cgroup's try_charge and uncharge, one C call each ---- */

/*
 * The ops of one cgroup of a legacy tree, bound once (cgroup_ops): its memory
 * counter's handle (a Counter of shmcounter._atomic, whose cached path the ops
 * walk), the Python that takes over where C cannot finish, and the words of the
 * memcg section the ops read.
 */
typedef struct {
    PyObject_HEAD
    CounterObject *memory;
    PyObject *otherwise;        /* otherwise(n, refused): try_charge_memcg goes on */
    PyObject *stepwise;         /* stepwise(n, kmem): uncharge, in Python steps   */
    PyObject *evicted;          /* evicted(slot): an eviction's second op, in Python */
    PyObject *handles;          /* list: counter index -> its handle or None      */
    int64_t guard, bad;         /* this cgroup's state word; its freed state      */
    int64_t states, cg_words;   /* cgroup 0's state word; the record stride       */
    int64_t eviction, random;   /* the eviction order's word; its random value    */
    legacy_state *st;           /* this module's state                            */
    atomic_state *ast;          /* shmcounter._atomic's (kept alive by `memory`)  */
} OpsObject;

/* What an attempt of try_charge did, or that Python must do it. */
enum { TC_OK = -1, TC_FALLBACK = -2, TC_ERROR = -3 };   /* >= 0: the refusing level */


/*
 * The arguments of an op: n (positional or n=), checked exactly as
 * page_counter.check_nr does (an int, not a bool, not an int subclass, in
 * [0, 2**62)); with kmem != NULL also kmem= (keyword only, a bool; default False).
 * *n_obj: the n object (borrowed).
 */
static int
op_args(const char *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
        int64_t *out, PyObject **n_obj, int *kmem)
{
    PyObject *n = nargs == 1 ? args[0] : NULL, *k = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int bad = nargs > 1;
    for (Py_ssize_t i = 0; i < nkw && !bad; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (!n && !PyUnicode_CompareWithASCIIString(name, "n"))
            n = args[nargs + i];
        else if (kmem && !k && !PyUnicode_CompareWithASCIIString(name, "kmem"))
            k = args[nargs + i];
        else
            bad = 1;
    }
    if (bad || !n) {
        PyErr_Format(PyExc_TypeError, kmem ? "%s() takes n and the keyword kmem"
                                           : "%s() takes exactly one argument, n", op);
        return -1;
    }
    if (check_nr(n, out) < 0)
        return -1;
    *n_obj = n;
    if (kmem && k && !PyBool_Check(k)) {
        PyErr_Format(PyExc_TypeError, "kmem must be a bool, got %R", k);
        return -1;
    }
    if (kmem)
        *kmem = k == Py_True;
    return 0;
}

/*
 * This CPU's legacy block: its first slot, or -1 when this process is not a CPU
 * (Slots.set_cpu) or the arena has no legacy section. CPU k, whose stock block is
 * the k-th, has the k-th legacy block (memcg/section.py).
 */
static inline int64_t
cpu_block(SlotsObject *s)
{
    if (s->cpu_block < 0 || s->ext_words != MC_WORDS || s->stock_block <= 0)
        return -1;
    int64_t cpu = (s->cpu_block - s->stocks) / s->stock_block;
    return cpu < s->ext_blocks ? s->ext_first + cpu * MC_WORDS : -1;
}

/* The random eviction order: a slot in [0, 7) from this process's generator. */
static int64_t
random_victim(legacy_state *st, int64_t owner)
{
    if (st->seeded_for != owner) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t z = (uint64_t)owner * 0x9e3779b97f4a7c15ULL + (uint64_t)ts.tv_nsec
                     + ((uint64_t)ts.tv_sec << 30);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;        /* splitmix64's finalizer */
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        st->rng = (z ^ (z >> 31)) | 1;
        st->seeded_for = owner;
    }
    st->rng ^= st->rng >> 12;
    st->rng ^= st->rng << 25;
    st->rng ^= st->rng >> 27;
    return (int64_t)((st->rng * 0x2545f4914f6cdd1dULL >> 32) % NR_MEMCG_STOCK);
}

/* The underflows of one cancel of an op: reported once the op has ended. Only
 * `counter` needs a value before cancel_path (NULL: none; the arrays are left
 * unset, as clearing them costs as much as a level step). */
typedef struct {
    CounterObject *counter;     /* whose path; NULL: none */
    int64_t nr;
    int under, level[MAX_DEPTH];
    int64_t new[MAX_DEPTH];
} cancelled;

/* Cancel nr at every level of co's path, inside an op; note its underflows in *c. */
static void
cancel_path(SlotsObject *s, CounterObject *co, int64_t nr, cancelled *c)
{
    c->under = path_cancel(s, co, nr, co->depth, c->level, c->new);
    c->counter = c->under ? co : NULL;
    c->nr = nr;
}

/* Warn of the underflows in *c (counter._underflow(level, new, nr)); -1 if one
 * raised. */
static int
report(cancelled *c)
{
    for (int u = 0; c->counter && u < c->under; u++) {
        PyObject *res = PyObject_CallMethod((PyObject *)c->counter, "_underflow", "iLL",
                                            c->level[u], (long long)c->new[u],
                                            (long long)c->nr);
        if (!res)
            return -1;
        Py_DECREF(res);
    }
    return 0;
}

/*
 * refill_stock(this cgroup, nr) inside the op of row r on the memory counter's path,
 * whose nr pages are charged, and which has charged `applied` pages at each level
 * so far (a charge op: the charge; a kmem uncharge: 0): the slot step
 * (refill_slots; the victim drawn first in the random eviction order, as
 * legacy._refill does), then, in the same op, the uncharge of the pages the stock
 * did not take (a bypass: nr; an overflow drain: the slot's pages). Returns the
 * slot word whose cgroup was evicted to its pending half (the caller uncharges it
 * in an op of its own, after this one), -1, or -2 with ArenaCorrupt, the op rolled
 * back and ended.
 */
static int64_t
refill_op(OpsObject *o, SlotsObject *s, int64_t *r, int64_t block, int64_t nr,
          int64_t applied, cancelled *c)
{
    CounterObject *co = o->memory;
    int64_t victim = -1, pages;
    if (LOAD(&s->words[o->eviction]) == o->random)
        victim = random_victim(o->st, s->owner);
    int i, action = refill_slots(o->st, s, r, s->words + block, block, co->index + 1, nr,
                                 victim, s->owner, &i, &pages);
    if (action < 0) {
        /* The op charged `applied` at every level and changed nothing else: take
         * them back, as op_abort (_atomic.c) would, and end it. */
        for (int l = 0; l < co->depth && applied; l++)
            level_cancel(s->words + co->rec[l],
                         l + 1 < co->depth ? s->words + co->rec[l + 1] : NULL,
                         s->words + s->contrib + co->idx[l], applied);
        op_leave(r);
        return -2;
    }
    if (action == LEGACY_BYPASS || action == LEGACY_OVERFLOW) {
        int64_t take = action == LEGACY_BYPASS ? nr : pages;
        /* the plan is final and the slot word holds its end value */
        op_forward(r, applied - take, co->depth,
                   i >= 0 ? LOAD(&s->words[block + MC_SLOTS + i]) : 0);
        cancel_path(s, co, take, c);
    }
    return action == LEGACY_EVICTED ? block + MC_SLOTS + i : -1;
}

/*
 * The handle of the cgroup tagged tag (its memory counter + 1), if C can run the
 * eviction's second op on its path: a bound Counter of this arena in the handle
 * list, whose cgroup record is in use. Else NULL (Python does it, and raises
 * ArenaCorrupt for a tag that names no cgroup: legacy._cgroup_of). Borrowed.
 */
static CounterObject *
victim_handle(OpsObject *o, SlotsObject *s, int64_t tag)
{
    int64_t index = tag - 1;
    if (index < 0 || index >= PyList_GET_SIZE(o->handles)
        || o->states + index * o->cg_words >= s->nwords
        || !LOAD(&s->words[o->states + index * o->cg_words]))
        return NULL;
    PyObject *h = PyList_GET_ITEM(o->handles, index);
    if (!(Py_IS_TYPE(h, Py_TYPE(o->memory))
          || PyObject_TypeCheck(h, (PyTypeObject *)o->ast->counter_type))
        || ((CounterObject *)h)->slots != s)
        return NULL;
    return (CounterObject *)h;
}

/*
 * The second op of an eviction (legacy._uncharge_evicted): uncharge the pending
 * half of slot word `slot` along the victim's path and clear that half, in an op of
 * its own whose intent record names the slot word. The word is read again inside
 * the op, as _drain_half does. Python does it where C cannot (victim_handle, or
 * the op cannot begin here). Returns 0, or -1 with an exception.
 */
static int
uncharge_evicted(OpsObject *o, SlotsObject *s, int64_t slot)
{
    int64_t *sw = s->words + slot, tag = LOAD(sw) >> (HALF + 8) & TAG_MASK, *r;
    if (tag == 0)
        return 0;
    CounterObject *victim = victim_handle(o, s, tag);
    if (!victim || !(r = writer_row(s)) || !op_enter_arena(s, r)) {
        PyObject *res = PyObject_CallFunction(o->evicted, "L", (long long)slot);
        Py_XDECREF(res);
        return res ? 0 : -1;
    }
    Py_INCREF(victim);
    cancelled c;
    c.counter = NULL;
    op_intent(s, r, victim, slot, sw);
    int64_t w = LOAD(sw);
    if ((w >> (HALF + 8) & TAG_MASK) == tag) {
        STORE(sw, w & CUR_MASK);
        /* the plan is final and the slot word holds its end value */
        op_forward(r, -(w >> HALF & NR_MASK), victim->depth, w & CUR_MASK);
        cancel_path(s, victim, w >> HALF & NR_MASK, &c);
    }
    op_leave(r);
    int rc = report(&c);
    Py_DECREF(victim);
    return rc;
}

/*
 * After the op that refilled: the eviction's second op (evicted: its slot word, or
 * -1), then the first op's underflows (an underflow raised as an error leaves both
 * ops complete). 0, or -1 with an exception.
 */
static int
after_refill(OpsObject *o, SlotsObject *s, int64_t evicted, cancelled *c)
{
    if (evicted >= 0 && uncharge_evicted(o, s, evicted) < 0)
        return -1;
    return report(c);
}

/*
 * try_charge_memcg's first attempt: the consume_stock hit; else, unless the cgroup
 * is freed, one op on the memory counter's path: charge max(64, nr) (nr if not a
 * CPU), on refusal retry once with exactly nr, refill the surplus (refill_op), and
 * after it the eviction's second op. Returns TC_OK, the refusing level, TC_FALLBACK
 * (Python takes over: a hook armed, no writer row, an op of another thread of
 * ours, a stop_machine, a freed cgroup) or TC_ERROR.
 */
static int
charge_attempt(OpsObject *o, SlotsObject *s, int64_t nr)
{
    CounterObject *co = o->memory;
    if (o->ast->hooks_armed || s->row < 0)
        return TC_FALLBACK;
    int64_t *w = s->words, block = cpu_block(s), *r;
    if (block >= 0
        && consume_slots(w + s->row, w + block, co->index + 1, nr, s->owner) == CONSUME_HIT)
        return TC_OK;                   /* a freed cgroup is in no slot: never here */
    if (LOAD(&w[o->guard]) == o->bad || !(r = writer_row(s)) || !op_enter_arena(s, r))
        return TC_FALLBACK;
    int64_t charge = block >= 0 && nr < MEMCG_CHARGE_BATCH ? MEMCG_CHARGE_BATCH : nr;
    op_intent(s, r, co, -1, NULL);
    int status, fail = path_charge(s, co, charge, 1, &status);
    if (fail >= 0 && status == LEVEL_REFUSED && charge > nr) {
        charge = nr;
        fail = path_charge(s, co, charge, 1, &status);
    }
    if (fail >= 0 && status == LEVEL_OVERFLOW) {
        op_leave(r);                            /* path_charge undid its levels */
        overflow(charge);
        return TC_ERROR;
    }
    int64_t evicted = -1;
    cancelled c;
    c.counter = NULL;
    if (fail < 0 && charge > nr
        && (evicted = refill_op(o, s, r, block, charge - nr, charge, &c)) == -2)
        return TC_ERROR;
    op_leave(r);
    if (after_refill(o, s, evicted, &c) < 0)
        return TC_ERROR;
    return fail < 0 ? TC_OK : fail;
}

PyDoc_STRVAR(ops_try_charge_doc,
"try_charge($self, n)\n--\n\n"
"try_charge_memcg for n pages: True, or what otherwise(n, refused) returns after a\n"
"refusal by counter `refused` (None: the attempt did not run in C).");

static PyObject *
Ops_try_charge(OpsObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t nr;
    PyObject *n;
    SlotsObject *s = o->memory->slots;
    if (op_args("try_charge", args, nargs, kwnames, &nr, &n, NULL) < 0 || !word(s, 0, 0))
        return NULL;
    int rc = charge_attempt(o, s, nr);
    if (rc == TC_OK)
        Py_RETURN_TRUE;
    if (rc == TC_ERROR)
        return NULL;
    PyObject *refused = rc == TC_FALLBACK ? Py_None
                                          : rc == 0 ? (PyObject *)o->memory
                                                    : PyTuple_GET_ITEM(o->memory->parents, rc - 1);
    return PyObject_CallFunctionObjArgs(o->otherwise, n, refused, NULL);
}

PyDoc_STRVAR(ops_uncharge_doc,
"uncharge($self, n, *, kmem=False)\n--\n\n"
"Uncharge n pages: a folio's through the hierarchy; kmem=True returns them to this\n"
"CPU's slot of the cgroup (refill_stock), up to 64 pages in a CPU process.");

static PyObject *
Ops_uncharge(OpsObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t nr, *r, block;
    PyObject *n;
    int kmem = 0;
    SlotsObject *s = o->memory->slots;
    if (op_args("uncharge", args, nargs, kwnames, &nr, &n, &kmem) < 0 || !word(s, 0, 0))
        return NULL;
    if (LOAD(&s->words[o->guard]) == o->bad)        /* freed: Python raises */
        return PyObject_CallFunctionObjArgs(o->stepwise, n, kmem ? Py_True : Py_False, NULL);
    if (!kmem || (block = cpu_block(s)) < 0 || nr > MEMCG_CHARGE_BATCH) {
        PyObject *call[2] = {(PyObject *)o->memory, n};   /* the Counter's own op */
        return PyObject_VectorcallMethod(o->st->uncharge_name, call,
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    if (o->ast->hooks_armed || !(r = writer_row(s)) || !op_enter_arena(s, r))
        return PyObject_CallFunctionObjArgs(o->stepwise, n, Py_True, NULL);
    cancelled c;
    c.counter = NULL;
    op_intent(s, r, o->memory, -1, NULL);
    int64_t evicted = refill_op(o, s, r, block, nr, 0, &c);
    if (evicted == -2)
        return NULL;
    op_leave(r);
    if (after_refill(o, s, evicted, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
Ops_traverse(OpsObject *o, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(o));
    Py_VISIT(o->memory);
    Py_VISIT(o->otherwise);
    Py_VISIT(o->stepwise);
    Py_VISIT(o->evicted);
    Py_VISIT(o->handles);
    return 0;
}

static int
Ops_clear(OpsObject *o)
{
    Py_CLEAR(o->memory);
    Py_CLEAR(o->otherwise);
    Py_CLEAR(o->stepwise);
    Py_CLEAR(o->evicted);
    Py_CLEAR(o->handles);
    return 0;
}

static void
Ops_dealloc(OpsObject *o)
{
    PyTypeObject *tp = Py_TYPE(o);
    PyObject_GC_UnTrack(o);
    Ops_clear(o);
    tp->tp_free((PyObject *)o);
    Py_DECREF(tp);
}

static PyObject *
Ops_repr(OpsObject *o)
{
    return PyUnicode_FromFormat("<CgroupOps of %R>", o->memory);
}

static PyMethodDef Ops_methods[] = {
    {"try_charge", (PyCFunction)(void (*)(void))Ops_try_charge,
     METH_FASTCALL | METH_KEYWORDS, ops_try_charge_doc},
    {"uncharge", (PyCFunction)(void (*)(void))Ops_uncharge,
     METH_FASTCALL | METH_KEYWORDS, ops_uncharge_doc},
    {NULL}
};

PyDoc_STRVAR(Ops_doc,
"The legacy ops of one cgroup, each one C call (built by cgroup_ops).");

static PyType_Slot Ops_slots[] = {
    {Py_tp_doc, (void *)Ops_doc},
    {Py_tp_methods, Ops_methods},
    {Py_tp_traverse, Ops_traverse},
    {Py_tp_clear, Ops_clear},
    {Py_tp_dealloc, Ops_dealloc},
    {Py_tp_repr, Ops_repr},
    {0, NULL},
};

static PyType_Spec Ops_spec = {
    .name = "shmcounter.memcg._legacy.CgroupOps",
    .basicsize = sizeof(OpsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Ops_slots,
};

/*
 * cgroup_ops(memory, otherwise, stepwise, evicted, handles, guard, bad, states,
 * cg_words, eviction, random) -> CgroupOps: the ops of the legacy cgroup whose
 * memory counter's handle is `memory` (a bound Counter). See the docstring.
 */
static PyObject *
legacy_cgroup_ops(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    legacy_state *st = PyModule_GetState(module);
    long long a[6];
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "cgroup_ops() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    atomic_state *ast = PyType_GetModuleState((PyTypeObject *)st->slots_type);
    PyObject *memory = args[0];
    if (!PyObject_TypeCheck(memory, (PyTypeObject *)ast->counter_type)
        || !((CounterObject *)memory)->slots) {
        PyErr_SetString(PyExc_TypeError, "cgroup_ops: memory must be a bound "
                        "shmcounter._atomic.Counter");
        return NULL;
    }
    for (int k = 1; k < 4; k++) {
        if (!PyCallable_Check(args[k])) {
            PyErr_Format(PyExc_TypeError, "cgroup_ops: argument %d must be callable", k + 1);
            return NULL;
        }
    }
    if (!PyList_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError, "cgroup_ops: handles must be a list");
        return NULL;
    }
    if (parse_ints("cgroup_ops", args + 5, nargs - 5, 6, a) < 0)
        return NULL;
    SlotsObject *s = ((CounterObject *)memory)->slots;
    if (!word(s, a[0], 1) || !word(s, a[2], 1) || !word(s, a[4], 1))
        return NULL;
    if (a[3] < 1) {
        PyErr_Format(PyExc_ValueError, "cgroup_ops: cg_words must be >= 1, got %lld", a[3]);
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)st->ops_type;
    OpsObject *o = (OpsObject *)tp->tp_alloc(tp, 0);
    if (!o)
        return NULL;
    o->memory = (CounterObject *)Py_NewRef(memory);
    o->otherwise = Py_NewRef(args[1]);
    o->stepwise = Py_NewRef(args[2]);
    o->evicted = Py_NewRef(args[3]);
    o->handles = Py_NewRef(args[4]);
    o->guard = a[0];
    o->bad = a[1];
    o->states = a[2];
    o->cg_words = a[3];
    o->eviction = a[4];
    o->random = a[5];
    o->st = st;
    o->ast = ast;
    return (PyObject *)o;
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
PyDoc_STRVAR(cgroup_ops_doc,
"cgroup_ops(memory, otherwise, stepwise, evicted, handles, guard, bad, states,\n"
"           cg_words, eviction, random, /)\n--\n\n"
"The try_charge and uncharge of the legacy cgroup whose memory counter's handle is\n"
"`memory` (a bound shmcounter._atomic.Counter), each one C call:\n"
"  try_charge(n)   the consume_stock hit, or one op on the memory counter's path\n"
"                  (greedy charge, exact retry, refill_stock), then the eviction's\n"
"                  second op on the victim's path: True; else otherwise(n, refused)\n"
"  uncharge(n, *, kmem=False)   kmem: refill_stock in one op (and the second op of\n"
"                  an eviction); else, or not a CPU, or n > 64: memory.uncharge(n)\n"
"Python takes over where C cannot finish: otherwise(n, None) and stepwise(n, kmem)\n"
"while a hook is armed, before this process has a writer row, while an op of\n"
"another of its threads is in progress or a stop_machine holds the stop word, and\n"
"for a freed cgroup (slot `guard` holds `bad`); evicted(slot) does the second op\n"
"for a victim whose handle is not in the list `handles` (counter index -> handle or\n"
"None). The victim's cgroup record must be in use: state word `states` + index *\n"
"`cg_words`. The eviction order is random while slot `eviction` holds `random`.");
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
    FAST(cgroup_ops),
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
    st->ops_type = PyType_FromModuleAndSpec(m, &Ops_spec, NULL);
    if (!st->ops_type || PyModule_AddObjectRef(m, "CgroupOps", st->ops_type) < 0)
        return -1;
    st->uncharge_name = PyUnicode_InternFromString("uncharge");
    if (!st->uncharge_name)
        return -1;
    st->seeded_for = 0;
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
    Py_VISIT(st->ops_type);
    return 0;
}

static int
legacy_clear(PyObject *m)
{
    legacy_state *st = PyModule_GetState(m);
    Py_CLEAR(st->slots_type);
    Py_CLEAR(st->arena_corrupt);
    Py_CLEAR(st->ops_type);
    Py_CLEAR(st->uncharge_name);
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
