/*
 * Counter: the page_counter ops of a handle, each one C call from the caller's
 * frame with the whole op inside it (part of shmcounter._atomic). PageCounter
 * (page_counter.py) is its Python subclass: the ops are methods of this type,
 * the rest of the handle is Python.
 *
 *   try_charge(n)   the stock hit; or one op: greedy walk, exact retry, deposit
 *                   of the surplus or its uncharge (page_counter.py documents it)
 *   charge(n)       one op: a forced walk
 *   uncharge(n)     one op: the RFC's return to stock when the counter asks for
 *                   it, then a walk down the hierarchy
 *   cancel(n)       one op on this level
 *   _drain_v4(first, end)   one op per CPU's lockless stock word that holds
 *                   pages: the remote drain (stock.py)
 *
 * Each op writes its intent record (op_intent, _op.h) before its first shared
 * store, exactly as the stepwise ops do, so stop_machine.py repairs both alike.
 * The C call holds the GIL from its first store to its last: no Python signal
 * handler and no other thread of this process runs inside it. The ops read this
 * process's writer row and CPU from the Slots object (set_writer, set_cpu).
 *
 * Python takes over, by calling a method of the handle, where C cannot finish:
 *   _try_charge_stepwise, _charge_stepwise, _uncharge_stepwise, _cancel_stepwise
 *       the same op in Python steps: while a hook is armed (shmcounter.hooks: a
 *       test stops or kills a process between two steps), before this process has
 *       a writer row, while an op of another thread of this process is in progress
 *       (it holds the op lock), or while a stop_machine holds the stop word;
 *   _refused(n, counter)   a refused try_charge: repair dead writers, maybe retry;
 *   _underflow(level, new, n)   an uncharge went below 0: warn (after the op).
 * None of these is on a path that a charge takes when nothing is wrong.
 *
 * ChargeOr: a try_charge of one counter answering True, else calling a Python
 * fallback; what a memcg cgroup binds as its try_charge (memcg/cgroup.py).
 */
#include "_op.h"
#include <structmember.h>

/* What the try_charge of a handle did, or that Python must do it. */
enum { TC_OK = -1, TC_FALLBACK = -2, TC_ERROR = -3 };   /* >= 0: the refusing level */


static inline atomic_state *
counter_state(CounterObject *co)
{
    return (atomic_state *)PyType_GetModuleState(Py_TYPE(co->slots));
}

/*
 * The one argument n of an op, checked exactly as page_counter.check_nr does: an
 * int (not a bool, not an int subclass) in [0, 2**62). Positional or n=.
 */
static int
nr_arg(const char *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
       int64_t *out)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw != 1
        || (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "n"))) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly one argument, n", op);
        return -1;
    }
    return check_nr(args[0], out);
}

/* A bound handle, its Slots not released; else the error, and NULL. */
static inline SlotsObject *
bound(CounterObject *co)
{
    if (co->slots == NULL) {
        PyErr_SetString(PyExc_TypeError, "this Counter is not bound to an arena (_bind)");
        return NULL;
    }
    if (co->slots->words == NULL) {
        word(co->slots, 0, 0);                  /* the release() error */
        return NULL;
    }
    return co->slots;
}

/* self.<name>(nr), for Python to take over. */
static PyObject *
python_op(CounterObject *co, const char *name, int64_t nr)
{
    return PyObject_CallMethod((PyObject *)co, name, "L", (long long)nr);
}

/* The handle of the path's level `level` (0: this counter). */
static PyObject *
level_handle(CounterObject *co, int level)
{
    PyObject *h = level == 0 ? (PyObject *)co : PyTuple_GET_ITEM(co->parents, level - 1);
    return Py_NewRef(h);
}

/*
 * This CPU's stock slot of the counter: its first word's index, or -1 (not a CPU,
 * or no stock); -2 with ArenaCorrupt for a stock id out of range.
 */
static inline int64_t
local_slot(CounterObject *co, SlotsObject *s, int64_t *cr)
{
    if (s->cpu_block < 0)
        return -1;
    int64_t sid = LOAD(&cr[PC_STOCK_ID]);
    if (sid == -1)
        return -1;
    if (sid < 0 || sid >= s->max_stocked) {
        corrupt(counter_state(co)->arena_corrupt, s, sid,
                "not -1 or a stock id below max_stocked", "counter %lld's stock_id",
                (long long)co->index);
        return -2;
    }
    return s->cpu_block + sid * STOCK_WORDS;
}

/*
 * The stock hit: take nr from this CPU's slot under its lock, or, for a lockless
 * counter (cr's flags), by a CAS on its word (_op.h). No op: it changes no usage,
 * and a kill leaves it done or not done. Busy while an op of this process is in
 * progress (another thread's, between its steps): that op's snapshot of the slot
 * must stay the slot's only change by this CPU.
 */
static inline int
stock_hit(SlotsObject *s, int64_t *cr, int64_t slot, int64_t nr)
{
    if (slot < 0 || LOAD(&s->words[s->row + R_OP]))
        return 0;
    int64_t *stock = s->words + slot;
    if (LOAD(&cr[PC_FLAGS]) & PC_FLAG_LOCKLESS)
        return v4_consume(stock, nr);
    if (!slot_trylock(stock, s->owner))
        return 0;
    int64_t have = LOAD(&stock[STOCK_NR]);
    int hit = have >= nr;
    if (hit)
        STORE_REL(&stock[STOCK_NR], have - nr);
    slot_unlock(stock);
    return hit;
}

/*
 * try_charge's steps 2-4 as one op: charge max(batch, nr) up the hierarchy
 * (greedy; batch 0 when `slot` is -1), on refusal retry once with exactly nr, then
 * deposit the surplus in `slot`, or uncharge it if the slot lock is busy (a
 * lockless slot: if its pages would reach 2**34). A lockless deposit marks the
 * op forward once its CAS is done; with the E14 cap, a word it would leave above
 * batch is taken and uncharged with the surplus (v4_deposit, _op.h).
 */
static int
charge_slow(CounterObject *co, SlotsObject *s, int64_t slot, int64_t nr)
{
    int64_t *r = writer_row(s), *cr = s->words + co->rec[0];
    int64_t *stock = slot >= 0 ? s->words + slot : NULL;
    if (r == NULL)
        return TC_FALLBACK;
    int64_t batch = stock ? LOAD(&cr[PC_BATCH]) : 0;       /* READ_ONCE(batch) */
    int64_t charge = batch > nr ? batch : nr;
    if (!op_enter_arena(s, r))
        return TC_FALLBACK;
    op_intent(s, r, co, slot, stock);
    int status, level[MAX_DEPTH];
    int64_t new[MAX_DEPTH];
    int fail = path_charge(s, co, charge, 1, &status);
    if (fail >= 0 && status == LEVEL_REFUSED && charge > nr) {
        charge = nr;
        fail = path_charge(s, co, charge, 1, &status);
    }
    if (fail >= 0 && status == LEVEL_OVERFLOW) {
        op_leave(r);                            /* path_charge undid its levels */
        overflow(charge);
        return TC_ERROR;
    }
    if (fail < 0 && charge > nr) {
        int64_t flags = LOAD(&cr[PC_FLAGS]);
        if (flags & PC_FLAG_LOCKLESS) {
            path_cancel(s, co, v4_deposit(r, stock, charge - nr, charge, co->depth,
                                          (flags & PC_FLAG_CAP) != 0),
                        co->depth, level, new);
        } else if (slot_trylock(stock, s->owner)) {
            STORE_REL(&stock[STOCK_NR], LOAD(&stock[STOCK_NR]) + charge - nr);
            slot_unlock(stock);
        } else {
            path_cancel(s, co, charge - nr, co->depth, level, new);
        }
    }
    op_leave(r);
    return fail < 0 ? TC_OK : fail;
}

/* The stock hit, then charge_slow: TC_OK, the refusing level, TC_FALLBACK, or
 * TC_ERROR. `guard` (ChargeOr): a word that, holding `bad`, sends the walk to
 * Python (a freed cgroup's state: a hit never meets one, it has no stock). */
static int
try_charge_core(CounterObject *co, SlotsObject *s, int64_t nr, int64_t guard, int64_t bad)
{
    if (s->row < 0)
        return TC_FALLBACK;
    int64_t slot = local_slot(co, s, s->words + co->rec[0]);
    if (slot == -2)
        return TC_ERROR;
    if (stock_hit(s, s->words + co->rec[0], slot, nr))
        return TC_OK;
    if (guard >= 0 && LOAD(&s->words[guard]) == bad)
        return TC_FALLBACK;
    return charge_slow(co, s, slot, nr);
}

PyDoc_STRVAR(try_charge_doc,
"try_charge($self, n)\n--\n\n"
"Charge n pages to this counter and every ancestor: (True, None), or (False, C)\n"
"with C the first counter whose max refused (see PageCounter.try_charge).");

static PyObject *
Counter_try_charge(CounterObject *co, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    int64_t nr;
    SlotsObject *s;
    if (nr_arg("try_charge", args, nargs, kwnames, &nr) < 0 || !(s = bound(co)))
        return NULL;
    atomic_state *st = counter_state(co);
    if (st->hooks_armed)
        return python_op(co, "_try_charge_stepwise", nr);
    int rc = try_charge_core(co, s, nr, -1, 0);
    switch (rc) {
    case TC_OK:
        return Py_NewRef(st->success);
    case TC_ERROR:
        return NULL;
    case TC_FALLBACK:
        return python_op(co, "_try_charge_stepwise", nr);
    }
    PyObject *fail = level_handle(co, rc);
    PyObject *res = PyObject_CallMethod((PyObject *)co, "_refused", "LO", (long long)nr, fail);
    Py_DECREF(fail);
    return res;
}

PyDoc_STRVAR(charge_doc,
"charge($self, n)\n--\n\n"
"Charge n pages to this counter and every ancestor, ignoring max (forced).");

static PyObject *
Counter_charge(CounterObject *co, PyObject *const *args, Py_ssize_t nargs,
               PyObject *kwnames)
{
    int64_t nr, *r;
    SlotsObject *s;
    if (nr_arg("charge", args, nargs, kwnames, &nr) < 0 || !(s = bound(co)))
        return NULL;
    if (counter_state(co)->hooks_armed || !(r = writer_row(s)) || !op_enter_arena(s, r))
        return python_op(co, "_charge_stepwise", nr);
    op_intent(s, r, co, -1, NULL);
    int status, fail = path_charge(s, co, nr, 0, &status);
    op_leave(r);
    if (fail >= 0)
        return overflow(nr);                    /* path_charge undid its levels */
    Py_RETURN_NONE;
}

/* Warn of each underflow of an op that has ended: self._underflow(level, new, nr). */
static PyObject *
underflows(CounterObject *co, int under, int *level, int64_t *new, int64_t nr)
{
    for (int u = 0; u < under; u++) {
        PyObject *res = PyObject_CallMethod((PyObject *)co, "_underflow", "iLL", level[u],
                                            (long long)new[u], (long long)nr);
        if (!res)
            return NULL;
        Py_DECREF(res);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(uncharge_doc,
"uncharge($self, n)\n--\n\n"
"Uncharge n pages from this counter and every ancestor (see PageCounter.uncharge).");

static PyObject *
Counter_uncharge(CounterObject *co, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    int64_t nr, *r;
    SlotsObject *s;
    if (nr_arg("uncharge", args, nargs, kwnames, &nr) < 0 || !(s = bound(co)))
        return NULL;
    if (counter_state(co)->hooks_armed || !(r = writer_row(s)))
        return python_op(co, "_uncharge_stepwise", nr);
    int64_t *cr = s->words + co->rec[0], slot = -1;
    if (LOAD(&cr[PC_FLAGS]) & PC_FLAG_UNCHARGE_TO_STOCK) {
        slot = local_slot(co, s, cr);
        if (slot == -2)
            return NULL;
    }
    int64_t *stock = slot >= 0 ? s->words + slot : NULL;
    if (!op_enter_arena(s, r))
        return python_op(co, "_uncharge_stepwise", nr);
    op_intent(s, r, co, slot, stock);
    int64_t excess = nr;
    if (stock && slot_trylock(stock, s->owner)) {
        /* the RFC: return the pages to the stock, keep at most batch there */
        int64_t stocked = LOAD(&stock[STOCK_NR]) + nr, keep = LOAD(&cr[PC_BATCH]);
        excess = stocked > keep ? stocked - keep : 0;
        op_forward(r, -excess, co->depth, stocked - excess);
        STORE_REL(&stock[STOCK_NR], stocked - excess);
        slot_unlock(stock);
    } else {
        op_forward(r, -nr, co->depth, stock ? LOAD(&stock[STOCK_NR]) : 0);
    }
    int level[MAX_DEPTH];
    int64_t new[MAX_DEPTH];
    int under = path_cancel(s, co, excess, co->depth, level, new);
    op_leave(r);
    return under ? underflows(co, under, level, new, excess) : Py_NewRef(Py_None);
}

PyDoc_STRVAR(cancel_doc,
"cancel($self, n)\n--\n\n"
"Take n pages out of this level only (page_counter_cancel).");

static PyObject *
Counter_cancel(CounterObject *co, PyObject *const *args, Py_ssize_t nargs,
               PyObject *kwnames)
{
    int64_t nr, *r;
    SlotsObject *s;
    if (nr_arg("cancel", args, nargs, kwnames, &nr) < 0 || !(s = bound(co)))
        return NULL;
    if (counter_state(co)->hooks_armed || !(r = writer_row(s)) || !op_enter_arena(s, r))
        return python_op(co, "_cancel_stepwise", nr);
    op_intent(s, r, co, -1, NULL);
    op_forward(r, -nr, 1, 0);
    int level[MAX_DEPTH];
    int64_t new[MAX_DEPTH];
    int under = path_cancel(s, co, nr, 1, level, new);
    op_leave(r);
    return under ? underflows(co, under, level, new, nr) : Py_NewRef(Py_None);
}

PyDoc_STRVAR(drain_v4_doc,
"_drain_v4($self, first, end, /)\n--\n\n"
"The remote drains of the lockless stock words of this counter of CPUs first to\n"
"end - 1, the caller holding the drain lock: for each word that holds pages, one\n"
"op of this process's writer row (intent, CAS, last, forward mark: v4_drain_take;\n"
"then the uncharge walk). Returns (pages, next): the pages taken, and the CPU\n"
"where Python must take over (PageCounterStock._drain_remote), or end.");

/* An uncharge walk of nr pages that took levels below 0, to report (_underflow). */
typedef struct {
    int under, level[MAX_DEPTH];
    int64_t new[MAX_DEPTH], nr;
} underflow_t;

/*
 * The remote drains of counter co's lockless words of CPUs first to end - 1, the
 * caller holding the drain lock: for each word that holds pages, one op of this
 * process's writer row (intent, CAS, last, forward mark: v4_drain_take; then the
 * uncharge walk). Adds the pages taken to *taken. Returns the CPU where it
 * stopped: end; the CPU after a drain whose walk went below 0 (u->under > 0, for
 * the caller to report, outside any lock); or the CPU where Python must take over
 * (a hook armed, no writer row yet, an op of another thread of ours in progress,
 * a stop_machine holding the stop word, or a stock id or flags word that Python
 * must report). Calls no Python code.
 */
static int64_t
drain_v4_words(CounterObject *co, SlotsObject *s, int64_t first, int64_t end,
               int64_t *taken, underflow_t *u)
{
    int64_t *cr = s->words + co->rec[0], sid = LOAD(&cr[PC_STOCK_ID]), cpu;
    u->under = 0;
    if (sid == -1)
        return end;                                     /* no stock: nothing to take */
    if (sid < 0 || sid >= s->max_stocked || !(LOAD(&cr[PC_FLAGS]) & PC_FLAG_LOCKLESS)
        || counter_state(co)->hooks_armed)
        return first;
    for (cpu = first; cpu < end; cpu++) {
        int64_t slot = s->stocks + cpu * s->stock_block + sid * STOCK_WORDS;
        int64_t *stock = s->words + slot, *r;
        if (v4_pages(LOAD(&stock[STOCK_NR])) == 0)
            continue;
        if (!(r = writer_row(s)) || !op_enter_arena(s, r))
            break;
        op_intent(s, r, co, slot, stock);
        int64_t nr = v4_drain_take(r, stock, co->depth);
        u->under = path_cancel(s, co, nr, co->depth, u->level, u->new);
        op_leave(r);
        *taken += nr;
        if (u->under) {
            u->nr = nr;
            return cpu + 1;
        }
    }
    return cpu;
}

/* _drain_v4(first, end): what stock.py's _drain_remote does in Python steps, one
 * C call for a range of CPUs (drain_v4_words, reporting each underflow). */
static PyObject *
Counter__drain_v4(CounterObject *co, PyObject *const *args, Py_ssize_t nargs)
{
    SlotsObject *s;
    long long a[2];
    for (Py_ssize_t i = 0; i < 2 && nargs == 2; i++) {
        a[i] = PyLong_CheckExact(args[i]) ? PyLong_AsLongLong(args[i]) : -2;
        if (a[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!(s = bound(co)))
        return NULL;
    if (nargs != 2 || !s->name || a[0] < 0 || a[0] > a[1] || a[1] > s->ncpus) {
        PyErr_SetString(PyExc_ValueError, "_drain_v4(first, end): 0 <= first <= end <= "
                        "ncpus, two ints");
        return NULL;
    }
    int64_t taken = 0, cpu = a[0];
    underflow_t u;
    do {
        cpu = drain_v4_words(co, s, cpu, a[1], &taken, &u);
        PyObject *res = u.under ? underflows(co, u.under, u.level, u.new, u.nr) : Py_None;
        if (!res)
            return NULL;
        if (u.under)
            Py_DECREF(res);
    } while (u.under);
    return Py_BuildValue("LL", (long long)taken, (long long)cpu);
}

/*
 * drain_all_v4(counters, lock): the whole of a lockless drain_all_stock in one C
 * call, for its latency: a drain is rare, so it mostly runs with cold caches,
 * where each Python frame costs microseconds (README, "Drains and hotplug").
 * Takes lock word `lock` (the drain lock) for this process if it is free: the
 * pid in its writer row's R_PID (the row this process claimed). Drains every
 * CPU's word of each counter (drain_v4_words), lets go. The GIL is held from
 * the lock's CAS to its release, with no Python code in between: no other thread
 * of this process sees the lock held by this call (drain.py's _drain_threads
 * serialises the Python holders). Returns the pages taken; -1: the lock was not
 * free, nothing done; -2: Python must take over (no writer row yet, a hook armed,
 * drain_v4_words stopped short, or an underflow, reported once the lock is let
 * go): the words drained so far stay drained.
 */
PyObject *
drain_all_v4(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    atomic_state *st = PyModule_GetState(m);
    long long lock;
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || !PyLong_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "drain_all_v4(counters, lock): a tuple of "
                        "Counters and an int");
        return NULL;
    }
    if ((lock = PyLong_AsLongLong(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(args[0]);
    SlotsObject *s = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyTuple_GET_ITEM(args[0], i);
        if (!PyObject_TypeCheck(c, (PyTypeObject *)st->counter_type)) {
            PyErr_Format(PyExc_TypeError, "drain_all_v4: %R is not a Counter", c);
            return NULL;
        }
        SlotsObject *cs = bound((CounterObject *)c);
        if (!cs)
            return NULL;
        if (s && cs != s) {
            PyErr_SetString(PyExc_ValueError, "drain_all_v4: counters of two arenas");
            return NULL;
        }
        s = cs;
    }
    if (!s)
        return PyLong_FromLong(0);                      /* no counter: nothing to do */
    int64_t *lw = word(s, lock, 1), me;
    if (!lw)
        return NULL;
    if (st->hooks_armed || s->row < 0 || (me = LOAD(&s->words[s->row + R_PID])) <= 0)
        return PyLong_FromLong(-2);
    if (!cas_strong(lw, 0, me))
        return PyLong_FromLong(-1);
    int64_t taken = 0, cpu = s->ncpus;
    underflow_t u = {0};
    CounterObject *co = NULL;
    for (Py_ssize_t i = 0; i < n && cpu == s->ncpus && !u.under; i++) {
        co = (CounterObject *)PyTuple_GET_ITEM(args[0], i);
        cpu = drain_v4_words(co, s, 0, s->ncpus, &taken, &u);
    }
    cas_strong(lw, me, 0);
    if (u.under) {
        PyObject *res = underflows(co, u.under, u.level, u.new, u.nr);
        if (!res)
            return NULL;
        Py_DECREF(res);
        return PyLong_FromLong(-2);
    }
    return PyLong_FromLongLong(cpu == s->ncpus ? taken : -2);
}

PyDoc_STRVAR(bind_doc,
"_bind($self, slots, path, parents, /)\n--\n\n"
"Bind the handle, once: `slots` is its arena's Slots (with a layout), `path` the\n"
"counter indexes from this counter to the root (at most MAX_DEPTH, each parent an\n"
"earlier counter), `parents` the handles of path[1:].");

static PyObject *
Counter_bind(CounterObject *co, PyTypeObject *defining, PyObject *const *args,
             Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 3 || kwnames) {
        PyErr_SetString(PyExc_TypeError, "_bind() takes 3 arguments");
        return NULL;
    }
    if (co->slots) {
        PyErr_SetString(PyExc_RuntimeError, "this Counter is already bound");
        return NULL;
    }
    PyObject *slots = args[0], *path = args[1], *parents = args[2];
    atomic_state *st = (atomic_state *)PyType_GetModuleState(defining);
    if (!PyObject_TypeCheck(slots, (PyTypeObject *)st->slots_type) || !PyTuple_Check(path)
        || !PyTuple_Check(parents)) {
        PyErr_SetString(PyExc_TypeError, "_bind(slots, path, parents): a Slots and two tuples");
        return NULL;
    }
    SlotsObject *s = (SlotsObject *)slots;
    Py_ssize_t depth = PyTuple_GET_SIZE(path);
    if (!s->name || depth < 1 || depth > MAX_DEPTH || PyTuple_GET_SIZE(parents) != depth - 1) {
        PyErr_SetString(PyExc_ValueError, "_bind: a Slots with a layout, 1 to MAX_DEPTH "
                        "levels and one parent handle per level above the first");
        return NULL;
    }
    for (Py_ssize_t l = 0; l < depth; l++) {
        long long i = PyLong_AsLongLong(PyTuple_GET_ITEM(path, l));
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0 || i >= s->max_counters || (l > 0 && i >= co->idx[l - 1])
            || !word(s, s->counters + i * PC_WORDS, PC_WORDS)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "_bind: level %zd's counter %lld is not a counter "
                         "earlier than the level below", l, i);
            return NULL;
        }
        co->idx[l] = i;
        co->rec[l] = s->counters + i * PC_WORDS;
    }
    co->index = co->idx[0];
    co->depth = depth;
    co->slots = (SlotsObject *)Py_NewRef(slots);
    co->parents = Py_NewRef(parents);
    Py_RETURN_NONE;
}

/* ---- ChargeOr: a memcg cgroup's try_charge ---------------------------------- */

typedef struct {
    PyObject_HEAD
    CounterObject *counter;
    PyObject *otherwise;
    int64_t guard, bad;
    vectorcallfunc vectorcall;
} ChargeOrObject;

static PyObject *
ChargeOr_vectorcall(ChargeOrObject *f, PyObject *const *args, size_t nargsf,
                    PyObject *kwnames)
{
    int64_t nr;
    CounterObject *co = f->counter;
    SlotsObject *s;
    if (nr_arg("try_charge", args, PyVectorcall_NARGS(nargsf), kwnames, &nr) < 0
        || !(s = bound(co)))
        return NULL;
    int rc = counter_state(co)->hooks_armed ? TC_FALLBACK
                                            : try_charge_core(co, s, nr, f->guard, f->bad);
    if (rc == TC_OK)
        Py_RETURN_TRUE;
    if (rc == TC_ERROR)
        return NULL;
    PyObject *refused = rc == TC_FALLBACK ? Py_NewRef(Py_None) : level_handle(co, rc);
    PyObject *n = PyLong_FromLongLong(nr);
    PyObject *res = n ? PyObject_CallFunctionObjArgs(f->otherwise, n, refused, NULL) : NULL;
    Py_XDECREF(n);
    Py_DECREF(refused);
    return res;
}

static int
ChargeOr_traverse(ChargeOrObject *f, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(f));
    Py_VISIT(f->counter);
    Py_VISIT(f->otherwise);
    return 0;
}

static int
ChargeOr_clear(ChargeOrObject *f)
{
    Py_CLEAR(f->counter);
    Py_CLEAR(f->otherwise);
    return 0;
}

static void
ChargeOr_dealloc(ChargeOrObject *f)
{
    PyTypeObject *tp = Py_TYPE(f);
    PyObject_GC_UnTrack(f);
    ChargeOr_clear(f);
    tp->tp_free((PyObject *)f);
    Py_DECREF(tp);
}

static PyObject *
ChargeOr_repr(ChargeOrObject *f)
{
    return PyUnicode_FromFormat("<ChargeOr of %R, else %R>", f->counter, f->otherwise);
}

static PyMemberDef ChargeOr_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(ChargeOrObject, vectorcall), READONLY, NULL},
    {NULL}
};

PyDoc_STRVAR(ChargeOr_doc,
"f(n) -> bool: True when n pages were charged to the counter (Counter.charge_or).");

static PyType_Slot ChargeOr_slots[] = {
    {Py_tp_doc, (void *)ChargeOr_doc},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, ChargeOr_members},
    {Py_tp_traverse, ChargeOr_traverse},
    {Py_tp_clear, ChargeOr_clear},
    {Py_tp_dealloc, ChargeOr_dealloc},
    {Py_tp_repr, ChargeOr_repr},
    {0, NULL},
};

PyType_Spec ChargeOr_spec = {
    .name = "shmcounter._atomic.ChargeOr",
    .basicsize = sizeof(ChargeOrObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = ChargeOr_slots,
};

PyDoc_STRVAR(charge_or_doc,
"_charge_or($self, otherwise, guard=-1, bad=0, /)\n--\n\n"
"A callable f(n) -> bool: True when try_charge(n) charged n pages here (a stock\n"
"hit, or one op), else otherwise(n, refused), refused being the counter that\n"
"refused the op, or None where the op did not run: a hook is armed, Python must\n"
"take over (see _try_charge_stepwise), or slot `guard` holds `bad` before a walk.");

static PyObject *
Counter_charge_or(CounterObject *co, PyObject *const *args, Py_ssize_t nargs)
{
    long long guard = -1, bad = 0;
    if (nargs < 1 || nargs > 3 || !PyCallable_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "_charge_or(otherwise, guard=-1, bad=0): "
                        "a callable and two ints");
        return NULL;
    }
    if ((nargs > 1 && (guard = PyLong_AsLongLong(args[1])) == -1 && PyErr_Occurred())
        || (nargs > 2 && (bad = PyLong_AsLongLong(args[2])) == -1 && PyErr_Occurred()))
        return NULL;
    SlotsObject *s = bound(co);
    if (!s || (guard >= 0 && !word(s, guard, 1)))
        return NULL;
    PyTypeObject *tp = (PyTypeObject *)counter_state(co)->charge_or_type;
    ChargeOrObject *f = (ChargeOrObject *)tp->tp_alloc(tp, 0);
    if (!f)
        return NULL;
    f->counter = (CounterObject *)Py_NewRef(co);
    f->otherwise = Py_NewRef(args[0]);
    f->guard = guard;
    f->bad = bad;
    f->vectorcall = (vectorcallfunc)ChargeOr_vectorcall;
    return (PyObject *)f;
}

/* ---- the Counter type ------------------------------------------------------------- */

static int
Counter_traverse(CounterObject *co, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(co));
    Py_VISIT(co->slots);
    Py_VISIT(co->parents);
    return 0;
}

static int
Counter_clear(CounterObject *co)
{
    Py_CLEAR(co->slots);
    Py_CLEAR(co->parents);
    return 0;
}

static void
Counter_dealloc(CounterObject *co)
{
    PyTypeObject *tp = Py_TYPE(co);
    PyObject_GC_UnTrack(co);
    Counter_clear(co);
    tp->tp_free((PyObject *)co);
    Py_DECREF(tp);
}

#define OP(name) \
    {#name, (PyCFunction)(void (*)(void))Counter_##name, METH_FASTCALL | METH_KEYWORDS, \
     name##_doc}

static PyMethodDef Counter_methods[] = {
    OP(try_charge), OP(charge), OP(uncharge), OP(cancel),
    {"_bind", (PyCFunction)(void (*)(void))Counter_bind,
     METH_METHOD | METH_FASTCALL | METH_KEYWORDS, bind_doc},
    {"_charge_or", (PyCFunction)(void (*)(void))Counter_charge_or, METH_FASTCALL,
     charge_or_doc},
    {"_drain_v4", (PyCFunction)(void (*)(void))Counter__drain_v4, METH_FASTCALL,
     drain_v4_doc},
    {NULL}
};

PyDoc_STRVAR(Counter_doc,
"Counter()\n--\n\n"
"The page_counter ops of a handle, one C call each (a base class: PageCounter).\n"
"Bound once with _bind; Python takes over through the handle's methods named in\n"
"shmcounter/_counter.c.");

static PyType_Slot Counter_slots[] = {
    {Py_tp_doc, (void *)Counter_doc},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_traverse, Counter_traverse},
    {Py_tp_clear, Counter_clear},
    {Py_tp_dealloc, Counter_dealloc},
    {Py_tp_methods, Counter_methods},
    {0, NULL},
};

PyType_Spec Counter_spec = {
    .name = "shmcounter._atomic.Counter",
    .basicsize = sizeof(CounterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Counter_slots,
};
