/*
 * shmcounter._atomic: atomic load, store, fetch_add, exchange and cas on aligned
 * 8-byte slots of a writable buffer, plus the fused page_counter and stock steps
 * built from them. Every operation is __ATOMIC_SEQ_CST: each one is a full
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
 * pays one call per step. They know the page_counter record layout below, which
 * shmcounter/layout.py documents and checks against the constants exported here.
 *
 * No operation blocks, so the GIL is never released: a trylock either succeeds at
 * once or reports busy, and waiting is the caller's business.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* page_counter record: 24 int64 words, three 64-byte lines (see layout.py). */
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

/* stock slot: 2 int64 words, [nr_pages, lock]; lock holds the holder's pid or 0. */
#define STOCK_NR 0
#define STOCK_LOCK 1
#define STOCK_WORDS 2

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD_FETCH(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

static int
cas_strong(int64_t *p, int64_t expected, int64_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---- module functions on (buffer, byte offset) -------------------------- */

static int64_t *
slot_at(Py_buffer *view, Py_ssize_t offset)
{
    if (offset < 0 || offset % 8 != 0 || offset + 8 > view->len) {
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

/* ---- Slots: the buffer held once, 8-byte slot indexes -------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* valid while words != NULL */
    int64_t *words;
    Py_ssize_t nwords;
} SlotsObject;

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
    return 0;
}

static void
Slots_dealloc(SlotsObject *self)
{
    if (self->words) {
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Bounds-checked pointer to slot i, spanning `span` words (a record or a slot). */
static inline int64_t *
word(SlotsObject *self, Py_ssize_t i, Py_ssize_t span)
{
    if (self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "Slots is released (the arena was closed)");
        return NULL;
    }
    if (i < 0 || i + span > self->nwords) {
        PyErr_Format(PyExc_IndexError, "slot %zd (+%zd) outside 0..%zd",
                     i, span, self->nwords);
        return NULL;
    }
    return self->words + i;
}

/*
 * Parse `want` int arguments of a METH_FASTCALL method into out[]. Public API only
 * (PyLong_AsLongLong), so the module builds on every CPython >= 3.11.
 */
static int
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

#define ARGS(name, want) \
    long long a[want]; \
    if (parse_ints(name, args, nargs, want, a) < 0) return NULL

static PyObject *
Slots_release(SlotsObject *self, PyObject *unused)
{
    if (self->words) {
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *
Slots_load(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    ARGS("load", 1);
    i = a[0];
    int64_t *p = word(self, i, 1);
    return p ? PyLong_FromLongLong(LOAD(p)) : NULL;
}

static PyObject *
Slots_store(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long v;
    ARGS("store", 2);
    i = a[0];
    v = a[1];
    int64_t *p = word(self, i, 1);
    if (!p)
        return NULL;
    STORE(p, (int64_t)v);
    Py_RETURN_NONE;
}

static PyObject *
Slots_fetch_add(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long v;
    ARGS("fetch_add", 2);
    i = a[0];
    v = a[1];
    int64_t *p = word(self, i, 1);
    return p ? PyLong_FromLongLong(__atomic_fetch_add(p, (int64_t)v, __ATOMIC_SEQ_CST))
             : NULL;
}

static PyObject *
Slots_exchange(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long v;
    ARGS("exchange", 2);
    i = a[0];
    v = a[1];
    int64_t *p = word(self, i, 1);
    return p ? PyLong_FromLongLong(XCHG(p, (int64_t)v)) : NULL;
}

static PyObject *
Slots_cas(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long expected, desired;
    ARGS("cas", 3);
    i = a[0];
    expected = a[1];
    desired = a[2];
    int64_t *p = word(self, i, 1);
    if (!p)
        return NULL;
    int64_t old = (int64_t)expected;
    __atomic_compare_exchange_n(p, &old, (int64_t)desired, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong(old);
}

/* ---- page_counter steps: one level each; the caller walks the hierarchy --- */

/*
 * propagate_protected_usage(c, usage): keep parent->children_{min,low}_usage equal
 * to the sum over children of min(usage, setting). Cheap read first; the exchange
 * makes concurrent propagations of one counter add their deltas exactly once.
 */
static void
propagate(int64_t *c, int64_t *parent, int64_t usage)
{
    if (parent == NULL)
        return;
    int64_t setting = LOAD(&c[PC_MIN]);
    int64_t protected = usage < setting ? usage : setting;
    if (protected != LOAD(&c[PC_MIN_USAGE])) {
        int64_t old = XCHG(&c[PC_MIN_USAGE], protected);
        if (protected != old)
            ADD_FETCH(&parent[PC_CHILDREN_MIN_USAGE], protected - old);
    }
    setting = LOAD(&c[PC_LOW]);
    protected = usage < setting ? usage : setting;
    if (protected != LOAD(&c[PC_LOW_USAGE])) {
        int64_t old = XCHG(&c[PC_LOW_USAGE], protected);
        if (protected != old)
            ADD_FETCH(&parent[PC_CHILDREN_LOW_USAGE], protected - old);
    }
}

/*
 * Racy by design, as in the kernel: two chargers can both pass new > watermark and
 * the smaller store can land last. Worst case the watermark misses one concurrent
 * charge; it is a statistic, never a limit.
 */
static inline void
bump_watermark(int64_t *c, int64_t usage)
{
    if (usage > LOAD(&c[PC_WATERMARK]))
        STORE(&c[PC_WATERMARK], usage);
}

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
 * pc_try_charge_level(c, p, nr) -> new usage, or -1 when c's max refused nr.
 * Speculative add, then compare: the add is a full barrier before max is read, so
 * either we see a concurrent set_max's new limit, or set_max re-reads usage after
 * its exchange and sees our add (see page_counter.set_max). On refusal the add is
 * undone and failcnt counts it (exactly: one atomic add, unlike the kernel's racy ++).
 */
static PyObject *
Slots_pc_try_charge_level(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t c, p;
    long long nr;
    int64_t *cr, *pr;
    ARGS("pc_try_charge_level", 3);
    c = a[0];
    p = a[1];
    nr = a[2];
    if (records(self, c, p, &cr, &pr) < 0)
        return NULL;
    int64_t new = ADD_FETCH(&cr[PC_USAGE], (int64_t)nr);
    if (new > LOAD(&cr[PC_MAX])) {
        ADD_FETCH(&cr[PC_USAGE], -(int64_t)nr);
        ADD_FETCH(&cr[PC_FAILCNT], 1);
        return PyLong_FromLong(-1);
    }
    propagate(cr, pr, new);
    bump_watermark(cr, new);
    return PyLong_FromLongLong(new);
}

/* pc_charge_level(c, p, nr) -> new usage. Forced: ignores max (page_counter_charge). */
static PyObject *
Slots_pc_charge_level(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t c, p;
    long long nr;
    int64_t *cr, *pr;
    ARGS("pc_charge_level", 3);
    c = a[0];
    p = a[1];
    nr = a[2];
    if (records(self, c, p, &cr, &pr) < 0)
        return NULL;
    int64_t new = ADD_FETCH(&cr[PC_USAGE], (int64_t)nr);
    propagate(cr, pr, new);
    bump_watermark(cr, new);
    return PyLong_FromLongLong(new);
}

/*
 * pc_cancel(c, p, nr) -> new usage; negative means an underflow (caller bug) that
 * was clamped. The clamp adds the deficit back instead of storing 0 as the kernel
 * does: a store would also erase a charge that raced in after our subtraction.
 */
static PyObject *
Slots_pc_cancel(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t c, p;
    long long nr;
    int64_t *cr, *pr;
    ARGS("pc_cancel", 3);
    c = a[0];
    p = a[1];
    nr = a[2];
    if (records(self, c, p, &cr, &pr) < 0)
        return NULL;
    int64_t new = ADD_FETCH(&cr[PC_USAGE], -(int64_t)nr);
    int64_t settled = new < 0 ? ADD_FETCH(&cr[PC_USAGE], -new) : new;
    propagate(cr, pr, settled);
    return PyLong_FromLongLong(new);
}

/* pc_propagate(c, p): re-propagate c's protected usage (after set_min/set_low). */
static PyObject *
Slots_pc_propagate(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t c, p;
    int64_t *cr, *pr;
    ARGS("pc_propagate", 2);
    c = a[0];
    p = a[1];
    if (records(self, c, p, &cr, &pr) < 0)
        return NULL;
    propagate(cr, pr, LOAD(&cr[PC_USAGE]));
    Py_RETURN_NONE;
}

/* ---- stock steps: slot s = [nr_pages, lock], owned by one CPU process ------ */

static inline int
slot_trylock(int64_t *s, int64_t owner)
{
    return cas_strong(&s[STOCK_LOCK], 0, owner);
}

static inline void
slot_unlock(int64_t *s)
{
    STORE(&s[STOCK_LOCK], 0);
}

/*
 * stock_consume(c, block, nr, owner) -> 1 hit, 0 miss (stock < nr), -1 slot busy,
 * -2 counter c has no stock. The fast path of try_charge in one call: read c's
 * stock id, trylock this CPU's slot (block = first word of this CPU's stock block),
 * take nr if the stock holds it, unlock. Only the owning CPU calls it.
 */
static PyObject *
Slots_stock_consume(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t c, block;
    long long nr, owner;
    ARGS("stock_consume", 4);
    c = a[0];
    block = a[1];
    nr = a[2];
    owner = a[3];
    int64_t *cr = word(self, c, PC_WORDS);
    if (!cr)
        return NULL;
    int64_t sid = LOAD(&cr[PC_STOCK_ID]);
    if (sid < 0)
        return PyLong_FromLong(-2);
    int64_t *s = word(self, block + sid * STOCK_WORDS, STOCK_WORDS);
    if (!s)
        return NULL;
    if (!slot_trylock(s, (int64_t)owner))
        return PyLong_FromLong(-1);
    int hit = 0;
    int64_t have = LOAD(&s[STOCK_NR]);
    if (have >= nr) {
        STORE(&s[STOCK_NR], have - (int64_t)nr);
        hit = 1;
    }
    slot_unlock(s);
    return PyLong_FromLong(hit);
}

/* stock_deposit(s, nr, owner) -> True if nr was added to slot s under its lock. */
static PyObject *
Slots_stock_deposit(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long nr, owner;
    ARGS("stock_deposit", 3);
    i = a[0];
    nr = a[1];
    owner = a[2];
    int64_t *s = word(self, i, STOCK_WORDS);
    if (!s)
        return NULL;
    if (!slot_trylock(s, (int64_t)owner))
        Py_RETURN_FALSE;
    STORE(&s[STOCK_NR], LOAD(&s[STOCK_NR]) + (int64_t)nr);
    slot_unlock(s);
    Py_RETURN_TRUE;
}

/* stock_take(s, owner) -> pages taken (slot left at 0) under the lock, or -1 busy. */
static PyObject *
Slots_stock_take(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long owner;
    ARGS("stock_take", 2);
    i = a[0];
    owner = a[1];
    int64_t *s = word(self, i, STOCK_WORDS);
    if (!s)
        return NULL;
    if (!slot_trylock(s, (int64_t)owner))
        return PyLong_FromLong(-1);
    int64_t have = LOAD(&s[STOCK_NR]);
    STORE(&s[STOCK_NR], 0);
    slot_unlock(s);
    return PyLong_FromLongLong(have);
}

/* stock_trylock(s, owner) -> bool; stock_unlock(s). For paths with several steps. */
static PyObject *
Slots_stock_trylock(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    long long owner;
    ARGS("stock_trylock", 2);
    i = a[0];
    owner = a[1];
    int64_t *s = word(self, i, STOCK_WORDS);
    if (!s)
        return NULL;
    return PyBool_FromLong(slot_trylock(s, (int64_t)owner));
}

static PyObject *
Slots_stock_unlock(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    ARGS("stock_unlock", 1);
    i = a[0];
    int64_t *s = word(self, i, STOCK_WORDS);
    if (!s)
        return NULL;
    slot_unlock(s);
    Py_RETURN_NONE;
}

static PyObject *
Slots_repr(SlotsObject *self)
{
    if (!self->words)
        return PyUnicode_FromString("<Slots released>");
    return PyUnicode_FromFormat("<Slots %zd words>", self->nwords);
}

#define FAST(name) {#name, (PyCFunction)(void (*)(void))Slots_##name, METH_FASTCALL, NULL}

static PyMethodDef Slots_methods[] = {
    {"release", (PyCFunction)Slots_release, METH_NOARGS,
     "release(): drop the buffer; later calls raise ValueError."},
    FAST(load), FAST(store), FAST(fetch_add), FAST(exchange), FAST(cas),
    FAST(pc_try_charge_level), FAST(pc_charge_level), FAST(pc_cancel), FAST(pc_propagate),
    FAST(stock_consume), FAST(stock_deposit), FAST(stock_take),
    FAST(stock_trylock), FAST(stock_unlock),
    {NULL}
};

static PyTypeObject SlotsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcounter._atomic.Slots",
    .tp_basicsize = sizeof(SlotsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Slots(buffer): seq_cst atomics on 8-byte slot indexes of a writable "
              "buffer, held until release().",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Slots_init,
    .tp_dealloc = (destructor)Slots_dealloc,
    .tp_repr = (reprfunc)Slots_repr,
    .tp_methods = Slots_methods,
};

static PyMethodDef module_methods[] = {
    {"load", mod_load, METH_VARARGS, "load(buf, offset) -> int"},
    {"store", mod_store, METH_VARARGS, "store(buf, offset, value)"},
    {"fetch_add", mod_fetch_add, METH_VARARGS, "fetch_add(buf, offset, delta) -> previous"},
    {"exchange", mod_exchange, METH_VARARGS, "exchange(buf, offset, value) -> previous"},
    {"cas", mod_cas, METH_VARARGS,
     "cas(buf, offset, expected, desired) -> previous; success iff previous == expected"},
    {NULL}
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT, "shmcounter._atomic",
    "seq_cst atomics on aligned 8-byte slots of shared buffers.", 0, module_methods,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    if (PyType_Ready(&SlotsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&atomic_module);
    if (!m)
        return NULL;
    Py_INCREF(&SlotsType);
    if (PyModule_AddObject(m, "Slots", (PyObject *)&SlotsType) < 0)
        goto failure;
#define CONST(n) if (PyModule_AddIntConstant(m, #n, n) < 0) goto failure
    CONST(PC_USAGE); CONST(PC_WATERMARK); CONST(PC_FAILCNT); CONST(PC_EMIN);
    CONST(PC_ELOW); CONST(PC_MIN_USAGE); CONST(PC_LOW_USAGE);
    CONST(PC_CHILDREN_MIN_USAGE); CONST(PC_CHILDREN_LOW_USAGE); CONST(PC_MAX);
    CONST(PC_MIN); CONST(PC_LOW); CONST(PC_HIGH); CONST(PC_PARENT); CONST(PC_BATCH);
    CONST(PC_STOCK_ID); CONST(PC_FLAGS); CONST(PC_WORDS);
    CONST(STOCK_NR); CONST(STOCK_LOCK); CONST(STOCK_WORDS);
#undef CONST
    return m;
failure:
    Py_DECREF(m);
    return NULL;
}
