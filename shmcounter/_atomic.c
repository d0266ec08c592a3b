/*
 * shmcounter._atomic: atomic load, store, fetch_add, exchange and cas on aligned
 * 8-byte slots of a writable buffer, plus the fused page_counter, stock and op
 * steps built from them. Every operation is __ATOMIC_SEQ_CST: each one is a full
 * barrier, which is what the ordering arguments in page_counter.py rely on
 * (kernel: atomic_long_add_return and atomic_long_xchg are fully ordered).
 *
 * Two shapes:
 *   - module functions load/store/fetch_add/exchange/cas(buf, offset, ...) take a
 *     buffer and a byte offset, acquire the buffer for the one call and release it;
 *   - Slots(buf) acquires the buffer once and takes 8-byte slot *indexes*. It keeps
 *     the segment mapped until release(); the hot paths use it, because acquiring
 *     a buffer per call costs more than the atomic itself.
 *
 * Slots also carries the fused steps, each one C call so that the Python hot path
 * pays one call per step. They know the page_counter record layout below and the
 * writer row and stock slot layouts of _slots.h, which shmcounter/segment.py
 * documents and imports from here. This is the core: it knows no layer above it.
 * A layer with C steps of its own (memcg/_legacy.c) includes _slots.h, takes a
 * Slots object as its first argument, and tells the core only which words of its
 * own section an op may name (the extension section of _slots.h).
 *
 * Only futex_wait blocks, so only it releases the GIL: a trylock either succeeds at
 * once or reports busy. A Python signal handler, like another thread, runs only
 * between bytecodes, so a critical section that is one C call is never seen half
 * done from inside its own process.
 *
 * Multi-phase init (PEP 489): Slots is a heap type of the module, and the module
 * state holds it and shmcounter.errors.ArenaCorrupt; nothing is a static global.
 */
#include "_op.h"
#include <errno.h>
#include <structmember.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "futex_wait waits on the low 32 bits of an int64 slot: little-endian only"
#endif

/* What stock_return and stock_take return when the slot lock is held. */
#define STOCK_BUSY (-1)

/* The state of the module that defined self's type (Slots is not subclassable). */
static inline atomic_state *
state_of(SlotsObject *self)
{
    return (atomic_state *)PyType_GetModuleState(Py_TYPE(self));
}

/* corrupt() with this module's ArenaCorrupt: only on the error paths. */
#define CORRUPT(self, ...) corrupt(state_of(self)->arena_corrupt, (self), __VA_ARGS__)

/* ---- module functions on (buffer, byte offset): the primitives, for any buffer;
 * the library itself uses Slots, which holds its buffer once ------------------ */

static int64_t *
slot_at(Py_buffer *view, Py_ssize_t offset)
{
    if (offset < 0 || offset % 8 != 0 || view->len < 8 || offset > view->len - 8) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is not an aligned 8-byte slot of a %zd-byte buffer "
                     "(need offset %% 8 == 0 and offset + 8 <= len)",
                     offset, view->len);
        return NULL;
    }
    if (((uintptr_t)view->buf) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 8-byte aligned");
        return NULL;
    }
    return (int64_t *)((char *)view->buf + offset);
}

static PyObject *
mod_load(PyObject *m, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "w*n:load", &view, &off))
        return NULL;
    int64_t *p = slot_at(&view, off);
    PyObject *res = p ? PyLong_FromLongLong(LOAD(p)) : NULL;
    PyBuffer_Release(&view);
    return res;
}

static PyObject *
mod_store(PyObject *m, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    long long v;
    if (!PyArg_ParseTuple(args, "w*nL:store", &view, &off, &v))
        return NULL;
    int64_t *p = slot_at(&view, off);
    if (p)
        STORE(p, (int64_t)v);
    PyBuffer_Release(&view);
    if (!p)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
mod_fetch_add(PyObject *m, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    long long v;
    if (!PyArg_ParseTuple(args, "w*nL:fetch_add", &view, &off, &v))
        return NULL;
    int64_t *p = slot_at(&view, off);
    PyObject *res = p ? PyLong_FromLongLong(
        __atomic_fetch_add(p, (int64_t)v, __ATOMIC_SEQ_CST)) : NULL;
    PyBuffer_Release(&view);
    return res;
}

static PyObject *
mod_exchange(PyObject *m, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    long long v;
    if (!PyArg_ParseTuple(args, "w*nL:exchange", &view, &off, &v))
        return NULL;
    int64_t *p = slot_at(&view, off);
    PyObject *res = p ? PyLong_FromLongLong(XCHG(p, (int64_t)v)) : NULL;
    PyBuffer_Release(&view);
    return res;
}

static PyObject *
mod_cas(PyObject *m, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    long long expected, desired;
    if (!PyArg_ParseTuple(args, "w*nLL:cas", &view, &off, &expected, &desired))
        return NULL;
    int64_t *p = slot_at(&view, off);
    PyObject *res = NULL;
    if (p) {
        int64_t old = (int64_t)expected;
        __atomic_compare_exchange_n(p, &old, (int64_t)desired, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        res = PyLong_FromLongLong(old);   /* previous value: success iff == expected */
    }
    PyBuffer_Release(&view);
    return res;
}

/* ---- Slots: the buffer held once, 8-byte slot indexes (_slots.h) -------- */

static int
Slots_init(SlotsObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Slots", kwlist, &obj))
        return -1;
    if (self->words) {
        PyErr_SetString(PyExc_RuntimeError, "Slots is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (((uintptr_t)self->view.buf) % 8 != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "buffer is not 8-byte aligned");
        return -1;
    }
    self->words = (int64_t *)self->view.buf;
    self->nwords = self->view.len / 8;
    self->row = self->contrib = self->cpu_block = self->stop = -1;
    self->owner = 0;
    return 0;
}

/* Not GC-tracked: a Slots refers only to a str, an exception class and its type,
 * none of which can refer back to it. An instance of a heap type owns a reference
 * to its type, dropped last. */
static void
Slots_dealloc(SlotsObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->words) {
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->released_type);
    Py_CLEAR(self->released_msg);
    Py_CLEAR(self->name);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Is s the first word (nr_pages) of a stock slot, [nr_pages, lock]? */
static int
is_stock_slot(SlotsObject *self, int64_t s)
{
    if (!self->name)
        return 1;
    if (s < self->stocks || s >= self->stocks + self->ncpus * self->stock_block)
        return 0;
    int64_t in = (s - self->stocks) % self->stock_block;
    return in % STOCK_WORDS == 0 && in / STOCK_WORDS < self->max_stocked;
}

/* Is s a word of the extension section that an op may name as its stock slot
 * (_slots.h)? None while no layer has set the section. */
static int
is_ext_slot(SlotsObject *self, int64_t s)
{
    if (!self->name)
        return 1;
    if (self->ext_words == 0 || s < self->ext_first
        || s >= self->ext_first + self->ext_blocks * self->ext_words)
        return 0;
    int64_t in = (s - self->ext_first) % self->ext_words;
    return in >= self->ext_lo && in < self->ext_hi;
}

#define ARGS(name, want) \
    long long a[want]; \
    if (parse_ints(name, args, nargs, want, a) < 0) return NULL

/*
 * set_layout(name, rows, counters, max_counters, stocks, stock_block, ncpus,
 * max_stocked, stop): the arena's sections (slot indexes, counts), for the checks of
 * the fused steps, and the stop_machine word. Once, by Arena.__init__.
 */
static PyObject *
Slots_set_layout(SlotsObject *self, PyObject *args)
{
    PyObject *name;
    long long v[8];
    if (!PyArg_ParseTuple(args, "ULLLLLLLL:set_layout", &name, &v[0], &v[1], &v[2], &v[3],
                          &v[4], &v[5], &v[6], &v[7]))
        return NULL;
    for (int k = 0; k < 8; k++) {
        if ((v[k] < 0 && !(k == 7 && v[k] == -1)) || v[k] > self->nwords) {
            PyErr_Format(PyExc_ValueError, "set_layout: argument %d is %lld, not in [0, %zd]",
                         k + 2, v[k], self->nwords);
            return NULL;
        }
    }
    if (v[4] < STOCK_WORDS) {
        PyErr_SetString(PyExc_ValueError, "set_layout: stock_block < 2 words");
        return NULL;
    }
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    self->rows = v[0];
    self->counters = v[1];
    self->max_counters = v[2];
    self->stocks = v[3];
    self->stock_block = v[4];
    self->ncpus = v[5];
    self->max_stocked = v[6];
    self->stop = v[7];
    Py_RETURN_NONE;
}

/*
 * set_writer(row, contrib): this process's writer row starts at slot `row`, its
 * contrib words at slot `contrib`; (-1, -1): none (not claimed, released, or a
 * forked child). The whole ops of _counter.c write with it.
 */
static PyObject *
Slots_set_writer(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("set_writer", 2);
    int64_t row = a[0], contrib = a[1];
    if (row == -1 && contrib == -1) {
        self->row = self->contrib = -1;
        Py_RETURN_NONE;
    }
    if (!word(self, row, ROW_WORDS) || !word(self, contrib, self->max_counters))
        return NULL;
    if (self->name && (row < self->rows || row >= self->counters
                       || (row - self->rows) % ROW_WORDS != 0)) {
        PyErr_Format(PyExc_ValueError, "set_writer: slot %lld is not a writer row",
                     (long long)row);
        return NULL;
    }
    self->row = row;
    self->contrib = contrib;
    Py_RETURN_NONE;
}

/*
 * set_cpu(block, owner): this process is the CPU whose stock block starts at slot
 * `block` and whose slot locks it takes with token `owner` (its pid); its writer
 * row is the CPU's row (set_writer). (-1, 0): not a CPU.
 */
static PyObject *
Slots_set_cpu(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("set_cpu", 2);
    int64_t block = a[0], owner = a[1];
    if (block != -1 || owner != 0) {
        if (owner <= 0 || !word(self, block, self->stock_block ? self->stock_block : 1))
            return owner <= 0 ? (PyErr_SetString(PyExc_ValueError, "set_cpu: owner must be "
                                                 "a pid > 0"), NULL) : NULL;
        if (self->name && (block < self->stocks
                           || (block - self->stocks) % self->stock_block != 0
                           || (block - self->stocks) / self->stock_block >= self->ncpus)) {
            PyErr_Format(PyExc_ValueError, "set_cpu: slot %lld is not a CPU's stock block",
                         (long long)block);
            return NULL;
        }
    }
    self->cpu_block = block;
    self->owner = owner;
    Py_RETURN_NONE;
}

static PyObject *
Slots_release(SlotsObject *self, PyObject *args)
{
    PyObject *type = NULL, *msg = NULL;
    if (!PyArg_ParseTuple(args, "|OU:release", &type, &msg))
        return NULL;
    if (type && !PyExceptionClass_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "release(): error_type must be an exception class");
        return NULL;
    }
    if (type && !msg) {
        PyErr_SetString(PyExc_TypeError, "release(): error_type needs a message");
        return NULL;
    }
    Py_XINCREF(type);
    Py_XSETREF(self->released_type, type);
    Py_XINCREF(msg);
    Py_XSETREF(self->released_msg, msg);
    if (self->words) {
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *
Slots_load(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("load", 1);
    int64_t *p = word(self, a[0], 1);
    return p ? PyLong_FromLongLong(LOAD(p)) : NULL;
}

static PyObject *
Slots_store(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("store", 2);
    int64_t *p = word(self, a[0], 1), v = a[1];
    if (!p)
        return NULL;
    STORE(p, (int64_t)v);
    Py_RETURN_NONE;
}

static PyObject *
Slots_fetch_add(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("fetch_add", 2);
    int64_t *p = word(self, a[0], 1), v = a[1];
    return p ? PyLong_FromLongLong(__atomic_fetch_add(p, (int64_t)v, __ATOMIC_SEQ_CST))
             : NULL;
}

static PyObject *
Slots_exchange(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("exchange", 2);
    int64_t *p = word(self, a[0], 1), v = a[1];
    return p ? PyLong_FromLongLong(XCHG(p, (int64_t)v)) : NULL;
}

static PyObject *
Slots_cas(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("cas", 3);
    int64_t *p = word(self, a[0], 1), expected = a[1], desired = a[2];
    if (!p)
        return NULL;
    int64_t old = (int64_t)expected;
    __atomic_compare_exchange_n(p, &old, (int64_t)desired, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong(old);
}

/* ---- page_counter steps: one level each; the caller walks the hierarchy --- */

/* Resolve (c, p) record indexes; p == -1 means "no parent". */
static int
records(SlotsObject *self, Py_ssize_t c, Py_ssize_t p, int64_t **cp, int64_t **pp)
{
    *cp = word(self, c, PC_WORDS);
    if (!*cp)
        return -1;
    *pp = NULL;
    if (p >= 0 && !(*pp = word(self, p, PC_WORDS)))
        return -1;
    return 0;
}

/*
 * The level steps, one level each, for the stepwise ops (page_counter.py, hooks
 * armed); the whole ops are _counter.c's. c, p: record of the counter and of its
 * parent (-1: none); k: the caller's contrib slot for c (_op.h has the contracts).
 *
 * pc_try_charge_level(c, p, k, nr) -> new usage, or None when c's max refused nr.
 * pc_charge_level(c, p, k, nr) -> new usage. Forced: ignores max.
 */
static PyObject *
level_step(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs, const char *name,
           int check_max)
{
    int64_t *cr, *pr, *k, new;
    ARGS(name, 4);
    int64_t nr = a[3];
    if (records(self, a[0], a[1], &cr, &pr) < 0 || !(k = word(self, a[2], 1)))
        return NULL;
    switch (level_charge(cr, pr, k, nr, check_max, &new)) {
    case LEVEL_OVERFLOW:
        return overflow(nr);
    case LEVEL_REFUSED:
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(new);
}

static PyObject *
Slots_pc_try_charge_level(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return level_step(self, args, nargs, "pc_try_charge_level", 1);
}

static PyObject *
Slots_pc_charge_level(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return level_step(self, args, nargs, "pc_charge_level", 0);
}

/* pc_cancel(c, p, k, nr) -> new usage; negative means an underflow (caller bug) that
 * was clamped (level_cancel). */
static PyObject *
Slots_pc_cancel(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t *cr, *pr, *k;
    ARGS("pc_cancel", 4);
    if (records(self, a[0], a[1], &cr, &pr) < 0 || !(k = word(self, a[2], 1)))
        return NULL;
    return PyLong_FromLongLong(level_cancel(cr, pr, k, a[3]));
}

/* pc_propagate(c, p): re-propagate c's protected usage (after set_min/set_low). */
static PyObject *
Slots_pc_propagate(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t *cr, *pr;
    ARGS("pc_propagate", 2);
    if (records(self, a[0], a[1], &cr, &pr) < 0)
        return NULL;
    propagate(cr, pr, LOAD(&cr[PC_USAGE]));
    Py_RETURN_NONE;
}

/* ---- stock steps: slot s = [nr_pages, lock], owned by one CPU process ------ */

/* Pointer to stock slot s, or NULL with ArenaCorrupt if s is not one (the caller
 * derived it from a counter's stock id, a word of the segment). */
static int64_t *
stock_slot(SlotsObject *self, int64_t s)
{
    if (!is_stock_slot(self, s))
        return (int64_t *)CORRUPT(self, s, "not a slot of the stocks section (a counter's "
                                  "stock_id is out of range)", "stock slot index");
    return word(self, s, STOCK_WORDS);
}

/* Is i a counter index (within max_counters; without a layout, within the buffer)? */
static int
counter_ok(SlotsObject *self, int64_t i)
{
    return i >= 0 && (self->name ? i < self->max_counters : i <= self->nwords / PC_WORDS);
}

/*
 * stock_consume(c, row, nr) -> CONSUME_HIT, CONSUME_MISS (stock < nr), CONSUME_BUSY,
 * or CONSUME_NO_STOCK (counter c has no stock). The fast path of try_charge in one
 * call: read c's stock id, trylock this CPU's slot (row: this CPU's writer row,
 * which holds its pid, the lock owner token, and the first slot of its stock
 * block), take nr if the stock holds it, unlock. Only the owning CPU calls it.
 * Busy also while an op of this CPU is in progress (row's op != 0: another thread
 * of the process): that op's intent snapshot of the slot must stay the slot's only
 * change, and the caller's slow path waits for the op instead.
 * The stock id and the block are words of the segment: ArenaCorrupt unless the id
 * is below max_stocked and the block is this CPU's (row's), so the slot is this
 * CPU's slot of some stock id. Two compares: free next to the call.
 * A lockless counter's slot is one word: a CAS, never busy (v4_consume, _op.h).
 */
static PyObject *
Slots_stock_consume(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_consume", 3);
    int64_t nr = a[2];
    int64_t *cr = word(self, a[0], PC_WORDS), *row = word(self, a[1], ROW_WORDS);
    if (!cr || !row)
        return NULL;
    if (LOAD(&row[R_OP]))
        return PyLong_FromLong(CONSUME_BUSY);
    int64_t owner = LOAD(&row[R_PID]), block = LOAD(&row[R_STOCK_BLOCK]);
    int64_t sid = LOAD(&cr[PC_STOCK_ID]);
    if (sid == -1)
        return PyLong_FromLong(CONSUME_NO_STOCK);
    if (self->name) {
        if (sid < 0 || sid >= self->max_stocked)
            return CORRUPT(self, sid, "not -1 or a stock id below max_stocked",
                           "counter %lld's stock_id",
                           (long long)((a[0] - self->counters) / PC_WORDS));
        int64_t cpu = (a[1] - self->rows) / ROW_WORDS;
        if (block != self->stocks + cpu * self->stock_block)
            return CORRUPT(self, block, "not the first slot of this CPU's stock block",
                           "CPU %lld's stock_block", (long long)cpu);
    }
    int64_t *s = word(self, block + sid * STOCK_WORDS, STOCK_WORDS);
    if (!s)
        return NULL;
    if (LOAD(&cr[PC_FLAGS]) & PC_FLAG_LOCKLESS)
        return PyLong_FromLong(v4_consume(s, nr) ? CONSUME_HIT : CONSUME_MISS);
    if (!slot_trylock(s, owner))
        return PyLong_FromLong(CONSUME_BUSY);
    int result = CONSUME_MISS;
    int64_t have = LOAD(&s[STOCK_NR]);
    if (have >= nr) {
        STORE(&s[STOCK_NR], have - nr);
        result = CONSUME_HIT;
    }
    slot_unlock(s);
    return PyLong_FromLong(result);
}

/*
 * local_slot(c, block) -> the slot of counter record c in the stock block starting
 * at slot `block` (this CPU's; -1: not a CPU), or -1 (no CPU, or no stock). The
 * counter's stock id is read once and checked: ArenaCorrupt unless -1 or below
 * max_stocked.
 */
static PyObject *
Slots_local_slot(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("local_slot", 2);
    int64_t *cr = word(self, a[0], PC_WORDS);
    if (!cr)
        return NULL;
    int64_t sid = LOAD(&cr[PC_STOCK_ID]), block = a[1];
    if (sid < -1 || (self->name && sid >= self->max_stocked))
        return CORRUPT(self, sid, "not -1 or a stock id below max_stocked",
                       "counter %lld's stock_id",
                       (long long)((a[0] - self->counters) / PC_WORDS));
    if (block < 0 || sid < 0)
        return PyLong_FromLong(-1);
    return PyLong_FromLongLong(block + sid * STOCK_WORDS);
}

/* stock_deposit(s, nr, owner) -> True if nr was added to slot s under its lock. */
static PyObject *
Slots_stock_deposit(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_deposit", 3);
    int64_t *s = stock_slot(self, a[0]);
    if (!s)
        return NULL;
    if (!slot_trylock(s, a[2]))
        Py_RETURN_FALSE;
    STORE(&s[STOCK_NR], LOAD(&s[STOCK_NR]) + a[1]);
    slot_unlock(s);
    Py_RETURN_TRUE;
}

/*
 * stock_return(s, batch, nr, owner) -> pages left for the caller to uncharge, or
 * STOCK_BUSY if the slot is busy. The RFC's stock-returning uncharge
 * (docs/stock-design.md §Uncharge) under the lock: add nr to slot s and keep at
 * most *batch there (batch: the counter's batch slot), returning the excess.
 */
static PyObject *
Slots_stock_return(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_return", 4);
    int64_t *s = stock_slot(self, a[0]), *batch = s ? word(self, a[1], 1) : NULL;
    if (!s || !batch)
        return NULL;
    if (!slot_trylock(s, a[3]))
        return PyLong_FromLong(STOCK_BUSY);
    int64_t stocked = LOAD(&s[STOCK_NR]) + a[2], keep = LOAD(batch);
    int64_t excess = stocked > keep ? stocked - keep : 0;
    STORE(&s[STOCK_NR], stocked - excess);
    slot_unlock(s);
    return PyLong_FromLongLong(excess);
}

/* stock_take(s, owner) -> pages taken (slot left at 0) under the lock, or
 * STOCK_BUSY. */
static PyObject *
Slots_stock_take(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_take", 2);
    int64_t *s = stock_slot(self, a[0]);
    if (!s)
        return NULL;
    if (!slot_trylock(s, a[1]))
        return PyLong_FromLong(STOCK_BUSY);
    int64_t have = XCHG(&s[STOCK_NR], 0);
    slot_unlock(s);
    return PyLong_FromLongLong(have);
}

static int check_intent(SlotsObject *self, int64_t row, int64_t *r, int64_t counters);

/*
 * stock_deposit_v4(row, s, d, charge, capped) -> the pages the caller must still
 * uncharge: 0 (deposited), d + the word's pages (capped, the word taken: the E14
 * cap), or d (nothing changed) when the pages of lockless word s would reach
 * 2**34. The deposit of d surplus pages of a charge of `charge` pages, inside the
 * charge op of writer row `row`, its walk complete: the intent before each CAS,
 * then op_forward once the CAS is done (v4_deposit, _op.h). One call: nothing of
 * this process runs between the CAS and the mark.
 */
static PyObject *
Slots_stock_deposit_v4(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_deposit_v4", 5);
    int64_t *r = word(self, a[0], ROW_WORDS), *s = r ? stock_slot(self, a[1]) : NULL;
    if (!s)
        return NULL;
    if (!LOAD(&r[R_OP]) || LOAD(&r[R_STOCK_SLOT]) != a[1] || a[2] <= 0 || a[3] < a[2]) {
        PyErr_SetString(PyExc_ValueError, "stock_deposit_v4: not inside an op naming "
                        "this slot, or not 0 < d <= charge");
        return NULL;
    }
    return PyLong_FromLongLong(v4_deposit(r, s, a[2], a[3], LOAD(&r[R_DEPTH]), a[4] != 0));
}

/*
 * stock_drain_v4(row, s) -> the pages taken from lockless word s (0: none), inside
 * an op of writer row `row` naming s, the drain lock held: intent, CAS, last and
 * the forward mark of its plan (minus the pages at every level of the op's path)
 * in one call (v4_drain_take, _op.h). The caller uncharges the pages.
 */
static PyObject *
Slots_stock_drain_v4(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_drain_v4", 2);
    int64_t *r = word(self, a[0], ROW_WORDS), *s = r ? stock_slot(self, a[1]) : NULL;
    if (!s)
        return NULL;
    if (!LOAD(&r[R_OP]) || LOAD(&r[R_STOCK_SLOT]) != a[1]) {
        PyErr_SetString(PyExc_ValueError, "stock_drain_v4: not inside an op naming "
                        "this slot");
        return NULL;
    }
    return PyLong_FromLongLong(v4_drain_take(r, s, LOAD(&r[R_DEPTH])));
}

/*
 * The plan a repair completes for the op of row r on a lockless word (its intent
 * checked): *levels and *delta as the op's forward mark says, or, when the op was
 * killed between its CAS and its mark, as v4_outcome finds (a deposit: the whole
 * charge, at every level; a drain: minus the pages it took). Returns the outcome.
 */
static int
v4_plan(int64_t *r, int64_t *stock, int64_t *levels, int64_t *delta)
{
    int outcome = v4_outcome(r, stock);
    *levels = LOAD(&r[R_FWD_LEVELS]);
    *delta = LOAD(&r[R_FWD_DELTA]);
    if (*levels == 0 && outcome == V4_DEPOSITED)
        *levels = LOAD(&r[R_DEPTH]);
    if (*levels == 0 && outcome == V4_DRAINED) {
        *levels = LOAD(&r[R_DEPTH]);
        *delta = -v4_pages(LOAD(&r[R_STOCK_BEFORE]));
    }
    return outcome;
}

/* The lockless word named by row r's op (its intent checked), or NULL. */
static int64_t *
v4_word(SlotsObject *self, int64_t *r, int64_t counters)
{
    int64_t slot = LOAD(&r[R_STOCK_SLOT]);
    if (slot < 0 || !is_stock_slot(self, slot) || !self->name)
        return NULL;
    int64_t *rec = word(self, counters + LOAD(&r[R_COUNTER]) * PC_WORDS, PC_WORDS);
    if (!rec || !(LOAD(&rec[PC_FLAGS]) & PC_FLAG_LOCKLESS)) {
        PyErr_Clear();
        return NULL;
    }
    return word(self, slot, STOCK_WORDS);
}

/*
 * stock_v4_plan(row, counters) -> None when row's op names no lockless word, else
 * (outcome, levels, delta): V4_NONE, V4_DEPOSITED or V4_DRAINED (v4_outcome,
 * _op.h), and the plan the repair completes (levels 0: roll back). For the repair
 * of a dead row, under stop_machine, after the dead drains' `last` is put right.
 * Reads only.
 */
static PyObject *
Slots_stock_v4_plan(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_v4_plan", 2);
    int64_t *r = word(self, a[0], ROW_WORDS);
    if (!r)
        return NULL;
    if (!LOAD(&r[R_OP]) || check_intent(self, a[0], r, a[1]) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int64_t *stock = v4_word(self, r, a[1]), levels, delta;
    if (!stock)
        Py_RETURN_NONE;
    int outcome = v4_plan(r, stock, &levels, &delta);
    return Py_BuildValue("iLL", outcome, (long long)levels, (long long)delta);
}

/*
 * stock_trylock(s, owner) -> bool; stock_unlock(s). The lock word of stock slot s
 * alone, for the stepwise consume and for tests that play a nested context holding
 * the slot. The other library paths use the fused steps.
 */
static PyObject *
Slots_stock_trylock(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_trylock", 2);
    int64_t *s = stock_slot(self, a[0]);
    if (!s)
        return NULL;
    return PyBool_FromLong(slot_trylock(s, a[1]));
}

static PyObject *
Slots_stock_unlock(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("stock_unlock", 1);
    int64_t *s = stock_slot(self, a[0]);
    if (!s)
        return NULL;
    slot_unlock(s);
    Py_RETURN_NONE;
}

/* ---- ops: the intent record that makes a killed writer repairable ----------- */

/*
 * op_begin(row, stop, counters, contrib, index, stock_slot) -> True, or False when a
 * stop_machine is in progress (nothing was written; wait on `stop` and retry).
 * stop = -1: no handshake, for the stop_machine holder acting for a dead row.
 *
 * Quiesce handshake (Dekker): we store in_op = 1, then load stop; the stopper
 * stores stop, then loads every live row's in_op. Both are seq_cst, so at least
 * one sees the other: either we back off, or the stopper waits for our op_end.
 *
 * Intent: snapshot contrib[row] of every level from `index` to the root (record
 * slots from `counters`, contrib slots from `contrib`), and the stock slot this op
 * may touch (-1: none), then set op = 1 last. A repair of a dead row rolls the op
 * back to exactly this snapshot; with op = 0 no change of this op has happened yet.
 */
static PyObject *
Slots_op_begin(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("op_begin", 6);
    int64_t *r = word(self, a[0], ROW_WORDS), *stop = NULL;
    int64_t counters = a[2], contrib = a[3], index = a[4], stock_slot = a[5];
    int64_t *stock = NULL;
    if (!r || (a[1] >= 0 && !(stop = word(self, a[1], 1))))
        return NULL;
    if (!counter_ok(self, index)) {
        PyErr_Format(PyExc_ValueError, "op_begin: %lld is not a counter index",
                     (long long)index);
        return NULL;
    }
    if (stock_slot >= 0) {
        if (!is_stock_slot(self, stock_slot) && !is_ext_slot(self, stock_slot)) {
            int64_t *rec = word(self, counters + index * PC_WORDS, PC_WORDS);
            int64_t sid = rec ? LOAD(&rec[PC_STOCK_ID]) : -1;
            if (sid >= self->max_stocked)
                return CORRUPT(self, sid, "not -1 or a stock id below max_stocked",
                               "counter %lld's stock_id", (long long)index);
            return CORRUPT(self, stock_slot, "not a slot of the stocks or extension sections",
                           "the stock slot of an op on counter %lld", (long long)index);
        }
        if (!(stock = word(self, stock_slot, STOCK_WORDS)))
            return NULL;
    }
    if (!op_enter(r, stop))
        Py_RETURN_FALSE;
    /* One walk: the snapshot is scratch until op = 1, so a bad parent found on the
     * way leaves no op behind. */
    int depth = 0;
    for (int64_t i = index; i >= 0; depth++) {
        int64_t *rec, *k, p;
        if (depth == MAX_DEPTH) {
            STORE(&r[R_IN_OP], 0);
            return CORRUPT(self, MAX_DEPTH + 1, "not at most MAX_DEPTH = 10: a parent word "
                           "is wrong", "the depth of counter %lld", (long long)index);
        }
        rec = word(self, counters + i * PC_WORDS, PC_WORDS);
        k = rec ? word(self, contrib + i, 1) : NULL;
        if (!k) {
            STORE(&r[R_IN_OP], 0);
            return NULL;
        }
        p = LOAD(&rec[PC_PARENT]);
        if (p < -1 || p >= i) {
            STORE(&r[R_IN_OP], 0);
            return CORRUPT(self, p, "not -1 or an earlier counter", "counter %lld's parent",
                           (long long)i);
        }
        STORE(&r[R_BASE + depth], LOAD(k));
        i = p;
    }
    op_seal(r, index, depth, stock_slot, stock);
    Py_RETURN_TRUE;
}

/*
 * op_forward(row, delta, levels, stock_after): mark row's op forward (_op.h): from
 * now a kill completes it to delta at each of its first `levels` levels, and its
 * stock word to stock_after. ValueError unless an op is in progress and levels is
 * in [1, its depth].
 */
static PyObject *
Slots_op_forward(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long a[4];
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "op_forward() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    /* delta modulo 2**64, as the usage words wrap: minus a corrupt INT64_MIN taken
     * from a stock word is a plan too, not an OverflowError */
    if (parse_ints("op_forward", args, 1, 1, a) < 0
        || parse_ints("op_forward", args + 2, 2, 2, a + 2) < 0)
        return NULL;
    a[1] = (long long)PyLong_AsUnsignedLongLongMask(args[1]);
    if (a[1] == -1 && PyErr_Occurred())
        return NULL;
    int64_t *r = word(self, a[0], ROW_WORDS);
    if (!r)
        return NULL;
    if (!LOAD(&r[R_OP]) || a[2] < 1) {
        PyErr_Format(PyExc_ValueError, LOAD(&r[R_OP]) ? "op_forward: %lld levels, not at "
                     "least 1" : "op_forward: no op in progress", (long long)a[2]);
        return NULL;
    }
    int64_t depth = LOAD(&r[R_DEPTH]);
    if (a[2] > depth)       /* op_begin walked the parent words: one changed since */
        return CORRUPT(self, depth, "not the number of levels of its counter's path: a "
                       "parent word is wrong", "the depth of row %lld's op",
                       self->name ? (long long)((a[0] - self->rows) / ROW_WORDS)
                                  : (long long)a[0]);
    op_forward(r, a[1], a[2], a[3]);
    Py_RETURN_NONE;
}

/*
 * The intent record of row r (slot index row) names a possible op: its counter, a
 * path of `depth` levels in which every parent is an earlier counter (parents are
 * created before their children) ending at a root, and a stock slot that is -1, a
 * stock slot or an op word of the extension section. Returns 0, or -1 with
 * ArenaCorrupt naming the first impossible word. Reads only.
 */
static int
check_intent(SlotsObject *self, int64_t row, int64_t *r, int64_t counters)
{
    long long rowno = self->name ? (long long)((row - self->rows) / ROW_WORDS) : (long long)row;
    int64_t index = LOAD(&r[R_COUNTER]), depth = LOAD(&r[R_DEPTH]);
    int64_t stock_slot = LOAD(&r[R_STOCK_SLOT]);
    if (!counter_ok(self, index)) {
        CORRUPT(self, index, "not a counter index", "row %lld's op counter", rowno);
        return -1;
    }
    if (depth < 1 || depth > MAX_DEPTH) {
        CORRUPT(self, depth, "not a path length in [1, 10]", "row %lld's op depth", rowno);
        return -1;
    }
    int64_t i = index;
    for (int64_t level = 0; level < depth; level++) {
        int64_t *rec = word(self, counters + i * PC_WORDS, PC_WORDS);
        if (!rec)
            return -1;
        int64_t p = LOAD(&rec[PC_PARENT]);
        if (p < -1 || p >= i) {
            CORRUPT(self, p, "not -1 or an earlier counter", "counter %lld's parent",
                    (long long)i);
            return -1;
        }
        if ((p < 0) != (level == depth - 1)) {
            CORRUPT(self, depth, "not the number of levels of its counter's path",
                    "row %lld's op depth", rowno);
            return -1;
        }
        i = p;
    }
    if (stock_slot < -1 || (stock_slot >= 0 && !is_stock_slot(self, stock_slot)
                            && !is_ext_slot(self, stock_slot))) {
        CORRUPT(self, stock_slot, "not -1 or a slot of the stocks or extension sections",
                "row %lld's op stock_slot", rowno);
        return -1;
    }
    int64_t levels = LOAD(&r[R_FWD_LEVELS]);
    if (levels < 0 || levels > depth) {
        CORRUPT(self, levels, "not a level count in [0, its op's depth]",
                "row %lld's op fwd_levels", rowno);
        return -1;
    }
    return 0;
}

/*
 * op_abort(row, counters, contrib) -> None. The op of this (live) row raised: put
 * every level of its path back to the snapshot taken by op_begin, and the stock
 * slot too, then end it; or, if the op was marked forward (op_forward, _op.h),
 * complete it to its plan. Exact, because an exception comes only between two
 * fused steps, when contrib[row] agrees with what the op did to usage. (A dead row
 * is repaired under stop_machine instead, residues included: stop_machine.py.)
 * An op on a lockless word (_op.h) is completed or rolled back as v4_outcome finds
 * (the word itself left alone): exact for this live row too, since its deposit
 * marks itself forward in the call that does its CAS, and its drain holds the
 * drain lock, so that nothing else changes the word's seq meanwhile.
 * An intent record that names no possible op (check_intent) rolls nothing back: it
 * raises ArenaCorrupt, having only left the quiesce section (in_op = 0, so that no
 * stop_machine waits for it); op stays set, the record as found.
 */
static PyObject *
Slots_op_abort(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("op_abort", 3);
    int64_t *r = word(self, a[0], ROW_WORDS);
    int64_t counters = a[1], contrib = a[2];
    if (!r)
        return NULL;
    if (LOAD(&r[R_OP])) {
        if (check_intent(self, a[0], r, counters) < 0) {
            STORE(&r[R_IN_OP], 0);
            return NULL;
        }
        int64_t i = LOAD(&r[R_COUNTER]), depth = LOAD(&r[R_DEPTH]);
        int64_t levels = LOAD(&r[R_FWD_LEVELS]), delta = LOAD(&r[R_FWD_DELTA]);
        int64_t *v4 = v4_word(self, r, counters);
        if (v4 && v4_plan(r, v4, &levels, &delta) == V4_DRAINED)
            STORE(&v4[STOCK_LAST], LOAD(&r[R_STOCK_BEFORE]));
        for (int64_t level = 0; level < depth && i >= 0; level++) {
            int64_t *rec = word(self, counters + i * PC_WORDS, PC_WORDS);
            int64_t *k = word(self, contrib + i, 1);
            if (!rec || !k)
                return NULL;
            int64_t target = level < levels ? delta : 0;
            int64_t change = LOAD(&r[R_BASE + level]) + target - LOAD(k);
            if (change) {
                ADD_FETCH(&rec[PC_USAGE], change);
                STORE(k, LOAD(k) + change);
            }
            i = LOAD(&rec[PC_PARENT]);
        }
        int64_t stock_slot = LOAD(&r[R_STOCK_SLOT]);
        int64_t *stock = stock_slot >= 0 ? word(self, stock_slot, 1) : NULL;
        if (stock_slot >= 0 && !stock)
            return NULL;
        if (stock && !v4)       /* a lockless word is never written back (_op.h) */
            STORE(&stock[STOCK_NR], LOAD(&r[levels ? R_STOCK_AFTER : R_STOCK_BEFORE]));
    }
    STORE(&r[R_OP], 0);
    STORE(&r[R_IN_OP], 0);
    Py_RETURN_NONE;
}

/* op_end(row): the op is complete (op = 0), then leave the quiesce section. */
static PyObject *
Slots_op_end(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("op_end", 1);
    int64_t *r = word(self, a[0], ROW_WORDS);
    if (!r)
        return NULL;
    STORE(&r[R_OP], 0);
    STORE(&r[R_IN_OP], 0);
    Py_RETURN_NONE;
}

/* ---- futex: cross-process sleep/wake on a slot -------------------------------- */

/*
 * futex_wait(i, expected, timeout_us) -> False on timeout, else True (woken, the
 * value already differed, or a signal ran its Python handler): the caller re-checks
 * its condition. Waits on the low 32 bits of slot i while they equal `expected`'s.
 * The only call here that blocks, so the only one that releases the GIL. A signal
 * interrupts it: its Python handler runs (PyErr_CheckSignals) before we return,
 * which is how a CPU waiting for a drain still serves drains sent to it.
 */
static PyObject *
Slots_futex_wait(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("futex_wait", 3);
    int64_t *p = word(self, a[0], 1);
    if (!p)
        return NULL;
    if (a[2] < 0) {
        PyErr_SetString(PyExc_ValueError, "timeout_us must be >= 0");
        return NULL;
    }
    struct timespec ts = {.tv_sec = a[2] / 1000000, .tv_nsec = (a[2] % 1000000) * 1000};
    uint32_t expected = (uint32_t)a[1];
    long rc;
    int err;
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAIT, expected, &ts, NULL, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc == 0 || err == EAGAIN)
        Py_RETURN_TRUE;
    if (err == ETIMEDOUT)
        Py_RETURN_FALSE;
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* futex_wake(i) -> number of waiters woken on slot i. */
static PyObject *
Slots_futex_wake(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGS("futex_wake", 1);
    int64_t *p = word(self, a[0], 1);
    if (!p)
        return NULL;
    long rc = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(rc);
}

static PyObject *
Slots_repr(SlotsObject *self)
{
    if (!self->words)
        return PyUnicode_FromString("<Slots released>");
    return PyUnicode_FromFormat("<Slots %zd words>", self->nwords);
}

/*
 * Docstrings: the first line is the signature (inspect.signature reads it), then
 * the contract. Every Slots method takes slot indexes (8-byte words from the
 * buffer's start) and raises IndexError outside the buffer, the release() error
 * once released, and ArenaCorrupt for an index derived from an impossible word.
 */
PyDoc_STRVAR(release_doc,
"release($self, error_type=None, message=None, /)\n--\n\n"
"Drop the buffer (the segment may then be unmapped). Every later call raises\n"
"error_type(message), or ValueError without them.");
PyDoc_STRVAR(set_layout_doc,
"set_layout($self, name, rows, counters, max_counters, stocks, stock_block, ncpus,\n"
"           max_stocked, stop, /)\n--\n\n"
"The arena's sections (slot indexes and counts) and its stop_machine word, once,\n"
"by Arena.__init__: from then on the fused steps check every index they derive\n"
"from a word of the segment against its section, and raise ArenaCorrupt naming\n"
"arena `name`.");
PyDoc_STRVAR(set_writer_doc,
"set_writer($self, row, contrib, /)\n--\n\n"
"This process's writer row starts at slot `row` and its contrib words at slot\n"
"`contrib`; (-1, -1): none. The ops of Counter write with it.");
PyDoc_STRVAR(set_cpu_doc,
"set_cpu($self, block, owner, /)\n--\n\n"
"This process is the CPU whose stock block starts at slot `block`, taking slot\n"
"locks with token `owner` (its pid); (-1, 0): not a CPU.");
PyDoc_STRVAR(load_doc, "load($self, i, /)\n--\n\nThe value of slot i (seq_cst load).");
PyDoc_STRVAR(store_doc, "store($self, i, value, /)\n--\n\nStore value in slot i (seq_cst).");
PyDoc_STRVAR(fetch_add_doc,
"fetch_add($self, i, delta, /)\n--\n\nAdd delta to slot i; return the previous value "
"(seq_cst).");
PyDoc_STRVAR(exchange_doc,
"exchange($self, i, value, /)\n--\n\nStore value in slot i; return the previous value "
"(seq_cst).");
PyDoc_STRVAR(cas_doc,
"cas($self, i, expected, desired, /)\n--\n\n"
"Compare and swap slot i (strong, seq_cst); return the previous value: the swap\n"
"happened iff it equals expected.");
PyDoc_STRVAR(pc_try_charge_level_doc,
"pc_try_charge_level($self, c, p, k, nr, /)\n--\n\n"
"One level of page_counter_try_charge: add nr to the usage of record c (parent\n"
"record p, -1: none) and to contrib slot k; return the new usage, or None when c's\n"
"max refused (the add undone, failcnt + 1). The add is a full barrier before max\n"
"is read (see page_counter.set_max). OverflowError past 2**63 - 1, undone.");
PyDoc_STRVAR(pc_charge_level_doc,
"pc_charge_level($self, c, p, k, nr, /)\n--\n\n"
"One level of page_counter_charge (forced, ignores max); return the new usage.\n"
"OverflowError past 2**63 - 1, undone.");
PyDoc_STRVAR(pc_cancel_doc,
"pc_cancel($self, c, p, k, nr, /)\n--\n\n"
"One level of page_counter_cancel: subtract nr from record c's usage and contrib\n"
"slot k; return the new usage. Negative means an underflow (a caller bug), whose\n"
"own deficit was added back.");
PyDoc_STRVAR(pc_propagate_doc,
"pc_propagate($self, c, p, /)\n--\n\n"
"Re-propagate record c's protected usage to parent record p (after set_min or\n"
"set_low).");
PyDoc_STRVAR(stock_consume_doc,
"stock_consume($self, c, row, nr, /)\n--\n\n"
"The stock hit of try_charge, on this CPU (row: its writer row): return\n"
"CONSUME_HIT (nr pages taken from its slot of counter record c, under the slot\n"
"lock), CONSUME_MISS (the slot holds fewer), CONSUME_BUSY (the lock is held, or\n"
"an op of this CPU is in progress) or CONSUME_NO_STOCK. Only the owning CPU\n"
"calls it.");
PyDoc_STRVAR(local_slot_doc,
"local_slot($self, c, block, /)\n--\n\n"
"The slot of counter record c in the stock block starting at slot `block`, or -1\n"
"(block -1: not a CPU; or c has no stock). ArenaCorrupt for an impossible stock id.");
PyDoc_STRVAR(stock_deposit_doc,
"stock_deposit($self, s, nr, owner, /)\n--\n\n"
"Add nr pages to stock slot s under its lock (owner: the lock token, the CPU's\n"
"pid); return False, changing nothing, if the lock is held.");
PyDoc_STRVAR(stock_return_doc,
"stock_return($self, s, batch, nr, owner, /)\n--\n\n"
"The RFC's stock-returning uncharge, under stock slot s's lock: add nr, keep at\n"
"most the value of slot `batch`, return the excess for the caller to uncharge;\n"
"or STOCK_BUSY, changing nothing, if the lock is held.");
PyDoc_STRVAR(stock_take_doc,
"stock_take($self, s, owner, /)\n--\n\n"
"Take every page of stock slot s under its lock (the slot left at 0) and return\n"
"them; or STOCK_BUSY, changing nothing, if the lock is held.");
PyDoc_STRVAR(stock_deposit_v4_doc,
"stock_deposit_v4($self, row, s, d, charge, capped, /)\n--\n\n"
"Inside the charge op of writer row `row` (its walk complete), deposit d surplus\n"
"pages of a charge of `charge` pages in lockless stock word s: record the intent,\n"
"CAS, retry on failure; then mark the op forward. capped (the E14 cap): a word\n"
"that would hold more than `charge` pages is taken instead. Returns the pages\n"
"left to uncharge: 0, d + the pages taken, or d (nothing changed) when the\n"
"word's pages would reach 2**34.");
PyDoc_STRVAR(stock_drain_v4_doc,
"stock_drain_v4($self, row, s, /)\n--\n\n"
"Inside an op of writer row `row` naming lockless stock word s, the drain lock\n"
"held: record the word W and (seq + 1) << 34, CAS, retry on failure; then store W\n"
"in the slot's last word and mark the op forward (minus pages(W) at every level).\n"
"Returns pages(W), or 0, changing no word, when the word holds none.");
PyDoc_STRVAR(stock_v4_plan_doc,
"stock_v4_plan($self, row, counters, /)\n--\n\n"
"None unless row's op names a lockless stock word; else (outcome, levels, delta):\n"
"whether its CAS happened (V4_NONE, V4_DEPOSITED, V4_DRAINED) and the plan a\n"
"repair completes (levels 0: roll back). Reads only.");
PyDoc_STRVAR(stock_trylock_doc,
"stock_trylock($self, s, owner, /)\n--\n\n"
"Take stock slot s's lock for owner if it is free; return whether it was taken.");
PyDoc_STRVAR(stock_unlock_doc,
"stock_unlock($self, s, /)\n--\n\nRelease stock slot s's lock (its holder only).");
PyDoc_STRVAR(op_begin_doc,
"op_begin($self, row, stop, counters, contrib, index, stock_slot, /)\n--\n\n"
"Begin an op of writer row `row` on counter `index` that may change `stock_slot`\n"
"(-1: none; a stock slot or an op word of the extension section): enter the\n"
"quiesce section, snapshot the path's contrib and the stock slot, set op = 1.\n"
"Return True; False when a stop_machine holds slot `stop` (nothing written: wait\n"
"and retry). stop = -1: no handshake (the stop_machine holder, for a dead row).");
PyDoc_STRVAR(op_forward_doc,
"op_forward($self, row, delta, levels, stock_after, /)\n--\n\n"
"Mark row's op forward: its plan is final (delta at each of its first `levels`\n"
"levels, its stock word ending at stock_after), and a kill from now on completes\n"
"it instead of rolling it back. Before the op's first decrease of a usage.");
PyDoc_STRVAR(op_end_doc,
"op_end($self, row, /)\n--\n\nEnd row's op (op = 0), then leave the quiesce section.");
PyDoc_STRVAR(op_abort_doc,
"op_abort($self, row, counters, contrib, /)\n--\n\n"
"Roll row's op (a live row's, that raised) back to its snapshot, then end it.\n"
"ArenaCorrupt, rolling nothing back, if the intent record names no possible op.");
PyDoc_STRVAR(futex_wait_doc,
"futex_wait($self, i, expected, timeout_us, /)\n--\n\n"
"Sleep while the low 32 bits of slot i equal expected's, at most timeout_us; return\n"
"False on timeout, else True (woken, already different, or a signal handler ran):\n"
"the caller re-checks. Releases the GIL.");
PyDoc_STRVAR(futex_wake_doc,
"futex_wake($self, i, /)\n--\n\nWake every waiter on slot i; return how many woke.");

#define FAST(name) \
    {#name, (PyCFunction)(void (*)(void))Slots_##name, METH_FASTCALL, name##_doc}

static PyMethodDef Slots_methods[] = {
    {"release", (PyCFunction)Slots_release, METH_VARARGS, release_doc},
    {"set_layout", (PyCFunction)Slots_set_layout, METH_VARARGS, set_layout_doc},
    FAST(set_writer), FAST(set_cpu),
    FAST(load), FAST(store), FAST(fetch_add), FAST(exchange), FAST(cas),
    FAST(pc_try_charge_level), FAST(pc_charge_level), FAST(pc_cancel), FAST(pc_propagate),
    FAST(stock_consume), FAST(local_slot), FAST(stock_deposit), FAST(stock_return),
    FAST(stock_take), FAST(stock_trylock), FAST(stock_unlock), FAST(stock_deposit_v4),
    FAST(stock_drain_v4), FAST(stock_v4_plan),
    FAST(op_begin), FAST(op_forward), FAST(op_end), FAST(op_abort), FAST(futex_wait), FAST(futex_wake),
    {NULL}
};

PyDoc_STRVAR(Slots_doc,
"Slots(buffer)\n--\n\n"
"seq_cst atomics and the fused steps on 8-byte slot indexes of a writable,\n"
"8-byte aligned buffer, held (exported) until release().");

static PyMemberDef Slots_members[] = {
    {"row", T_LONGLONG, offsetof(SlotsObject, row), READONLY,
     "This process's writer row (its first slot), or -1 (set_writer)."},
    {"contrib", T_LONGLONG, offsetof(SlotsObject, contrib), READONLY,
     "The first of this process's contrib words, or -1 (set_writer)."},
    {"cpu_block", T_LONGLONG, offsetof(SlotsObject, cpu_block), READONLY,
     "This CPU's stock block (its first slot), or -1: not a CPU (set_cpu)."},
    {"owner", T_LONGLONG, offsetof(SlotsObject, owner), READONLY,
     "This CPU's slot lock token (its pid), or 0 (set_cpu)."},
    {NULL}
};

static PyType_Slot Slots_slots[] = {
    {Py_tp_members, Slots_members},
    {Py_tp_doc, (void *)Slots_doc},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Slots_init},
    {Py_tp_dealloc, Slots_dealloc},
    {Py_tp_repr, Slots_repr},
    {Py_tp_methods, Slots_methods},
    {0, NULL},
};

static PyType_Spec Slots_spec = {
    .name = "shmcounter._atomic.Slots",
    .basicsize = sizeof(SlotsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Slots_slots,
};

/* ---- the module ---------------------------------------------------------------- */

PyDoc_STRVAR(mod_load_doc,
"load(buf, offset, /)\n--\n\nThe value of the 8-byte slot at byte `offset` of buf "
"(seq_cst).");
PyDoc_STRVAR(mod_store_doc,
"store(buf, offset, value, /)\n--\n\nStore value in the slot at byte `offset` "
"(seq_cst).");
PyDoc_STRVAR(mod_fetch_add_doc,
"fetch_add(buf, offset, delta, /)\n--\n\nAdd delta to the slot at byte `offset`; "
"return the previous value (seq_cst).");
PyDoc_STRVAR(mod_exchange_doc,
"exchange(buf, offset, value, /)\n--\n\nStore value in the slot at byte `offset`; "
"return the previous value (seq_cst).");
PyDoc_STRVAR(mod_cas_doc,
"cas(buf, offset, expected, desired, /)\n--\n\n"
"Compare and swap the slot at byte `offset` (strong, seq_cst); return the previous\n"
"value: the swap happened iff it equals expected.");

/* The Counter and ChargeOr types, and drain_all_v4 (_counter.c). */
extern PyType_Spec Counter_spec, ChargeOr_spec;
extern PyObject *drain_all_v4(PyObject *m, PyObject *const *args, Py_ssize_t nargs);

PyDoc_STRVAR(drain_all_v4_doc,
"drain_all_v4(counters, lock, /)\n--\n\n"
"A lockless drain_all_stock in one call: take lock word `lock` (the drain lock)\n"
"for this process (the pid of its writer row) if it is free, take every CPU's\n"
"word of each Counter of the tuple `counters` in ops of the row, let go. Returns\n"
"the pages taken; -1: the lock was not free, nothing done; -2: Python must take\n"
"over (no writer row yet, a hook armed, a stop_machine...): the words drained\n"
"so far stay drained, the lock is let go.");

PyDoc_STRVAR(set_hooks_armed_doc,
"set_hooks_armed(armed, /)\n--\n\n"
"Whether a Python hook is armed in this process (shmcounter.hooks): the ops of\n"
"Counter then take their stepwise Python paths.");

static PyObject *
mod_set_hooks_armed(PyObject *m, PyObject *armed)
{
    int on = PyObject_IsTrue(armed);
    if (on < 0)
        return NULL;
    ((atomic_state *)PyModule_GetState(m))->hooks_armed = on;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_hooks_armed", mod_set_hooks_armed, METH_O, set_hooks_armed_doc},
    {"drain_all_v4", (PyCFunction)(void (*)(void))drain_all_v4, METH_FASTCALL,
     drain_all_v4_doc},
    {"load", mod_load, METH_VARARGS, mod_load_doc},
    {"store", mod_store, METH_VARARGS, mod_store_doc},
    {"fetch_add", mod_fetch_add, METH_VARARGS, mod_fetch_add_doc},
    {"exchange", mod_exchange, METH_VARARGS, mod_exchange_doc},
    {"cas", mod_cas, METH_VARARGS, mod_cas_doc},
    {NULL}
};

/* Module exec (PEP 489): fill the state, then the module's names. A failure leaves
 * the state to atomic_clear, and the module is dropped. */
static int
atomic_exec(PyObject *m)
{
    atomic_state *st = PyModule_GetState(m);
    PyObject *errors = PyImport_ImportModule("shmcounter.errors");
    if (!errors)
        return -1;
    st->arena_corrupt = PyObject_GetAttrString(errors, "ArenaCorrupt");
    Py_DECREF(errors);
    if (!st->arena_corrupt)
        return -1;
    st->slots_type = PyType_FromModuleAndSpec(m, &Slots_spec, NULL);
    if (!st->slots_type || PyModule_AddObjectRef(m, "Slots", st->slots_type) < 0)
        return -1;
    st->counter_type = PyType_FromModuleAndSpec(m, &Counter_spec, NULL);
    if (!st->counter_type || PyModule_AddObjectRef(m, "Counter", st->counter_type) < 0)
        return -1;
    st->charge_or_type = PyType_FromModuleAndSpec(m, &ChargeOr_spec, NULL);
    if (!st->charge_or_type || PyModule_AddObjectRef(m, "ChargeOr", st->charge_or_type) < 0)
        return -1;
    st->success = Py_BuildValue("(OO)", Py_True, Py_None);
    if (!st->success)
        return -1;
#define CONST(n) if (PyModule_AddIntConstant(m, #n, n) < 0) return -1
    CONST(PC_USAGE); CONST(PC_WATERMARK); CONST(PC_FAILCNT); CONST(PC_EMIN);
    CONST(PC_ELOW); CONST(PC_MIN_USAGE); CONST(PC_LOW_USAGE);
    CONST(PC_CHILDREN_MIN_USAGE); CONST(PC_CHILDREN_LOW_USAGE); CONST(PC_MAX);
    CONST(PC_MIN); CONST(PC_LOW); CONST(PC_HIGH); CONST(PC_PARENT); CONST(PC_BATCH);
    CONST(PC_STOCK_ID); CONST(PC_FLAGS); CONST(PC_WORDS);
    CONST(STOCK_NR); CONST(STOCK_LOCK); CONST(STOCK_WORDS);
    CONST(R_PID); CONST(R_DONE_SEQ); CONST(R_STOCK_BLOCK); CONST(R_START); CONST(R_REQ_SEQ);
    CONST(R_IN_OP); CONST(R_OP); CONST(R_COUNTER); CONST(R_STOCK_SLOT);
    CONST(R_STOCK_BEFORE); CONST(R_DEPTH); CONST(R_BASE); CONST(R_WALKS); CONST(R_FWD_LEVELS);
    CONST(R_FWD_DELTA); CONST(R_STOCK_AFTER); CONST(MAX_DEPTH);
    CONST(ROW_WORDS); CONST(PC_FLAG_UNCHARGE_TO_STOCK); CONST(PC_FLAG_LOCKLESS); CONST(PC_FLAG_CAP);
    CONST(STOCK_LAST); CONST(V4_PAGES_BITS); CONST(V4_SEQ_MOD);
    CONST(V4_NONE); CONST(V4_DEPOSITED); CONST(V4_DRAINED);
    CONST(CONSUME_HIT); CONST(CONSUME_MISS); CONST(CONSUME_BUSY); CONST(CONSUME_NO_STOCK);
    CONST(STOCK_BUSY);
#undef CONST
    return 0;
}

static int
atomic_traverse(PyObject *m, visitproc visit, void *arg)
{
    atomic_state *st = PyModule_GetState(m);
    Py_VISIT(st->slots_type);
    Py_VISIT(st->counter_type);
    Py_VISIT(st->charge_or_type);
    Py_VISIT(st->arena_corrupt);
    Py_VISIT(st->success);
    return 0;
}

static int
atomic_clear(PyObject *m)
{
    atomic_state *st = PyModule_GetState(m);
    Py_CLEAR(st->slots_type);
    Py_CLEAR(st->counter_type);
    Py_CLEAR(st->charge_or_type);
    Py_CLEAR(st->arena_corrupt);
    Py_CLEAR(st->success);
    return 0;
}

static void
atomic_free(void *m)
{
    atomic_clear((PyObject *)m);
}

/*
 * No Py_mod_multiple_interpreters slot (3.12+): the default stands. The module
 * keeps no static state and could run in sub-interpreters, but the library above
 * it needs numpy, which does not.
 */
static PyModuleDef_Slot atomic_slots[] = {
    {Py_mod_exec, atomic_exec},
    {0, NULL},
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmcounter._atomic",
    .m_doc = "seq_cst atomics on aligned 8-byte slots of shared buffers, and the core's "
             "fused steps (Slots).",
    .m_size = sizeof(atomic_state),
    .m_methods = module_methods,
    .m_slots = atomic_slots,
    .m_traverse = atomic_traverse,
    .m_clear = atomic_clear,
    .m_free = atomic_free,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    return PyModuleDef_Init(&atomic_module);
}
