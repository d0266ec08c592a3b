/*
 * shmcounter/_op.h: the op kernel, shared by the core's steps (_atomic.c), its
 * whole ops (_counter.c) and the legacy ops (memcg/_legacy.c). One level of
 * page_counter (charge, try_charge, cancel, protected usage, watermark), and the
 * op bracket around a walk: enter the quiesce section, write the intent record,
 * leave, or roll back. Header-only: every function is static inline.
 *
 * An op, as writer.py and stop_machine.py describe it:
 *
 *     op_enter     in_op = 1, then read stop (Dekker with stop_machine)
 *     op_intent    snapshot contrib[row] along the path and the stock slot the op
 *                  may touch, then op = 1: from here a kill is rolled back
 *     ... level steps, each a usage change, then its contrib change ...
 *     op_forward   (an op that uncharges) its plan is final: from here a kill is
 *                  rolled forward, to the plan
 *     ... level steps ...
 *     op_leave     op = 0, then in_op = 0
 *
 * Nothing shared is written before op_intent has set op = 1, in every caller.
 *
 * Back or forward: rolling back an op that took pages out of usage would put them
 * back, and another CPU may have charged into the room meanwhile: usage could end
 * above max. So an op that uncharges marks itself forward, once it knows exactly
 * what it will do and before its first decrease: with delta the net change at
 * each of the first `levels` levels of its path (0 above them) and stock_after
 * the value its stock word ends at. A repair then completes it instead: each
 * level and the stock word end as the plan says, counted wholly. An op that only
 * charges (or cancels its own charge) stays a rollback op: undoing it only takes
 * pages out.
 */
#ifndef SHMCOUNTER_OP_H
#define SHMCOUNTER_OP_H

#include "_slots.h"

/*
 * A handle's cached path (Counter, _counter.c): the record slot and the counter
 * index of each level, from the counter itself (level 0) to the root. The parent
 * words never change after creation; the path was checked once, when the handle
 * was bound (MAX_DEPTH levels, each parent an earlier counter).
 */
typedef struct {
    PyObject_HEAD
    SlotsObject *slots;         /* the arena's; holds the mapping */
    PyObject *parents;          /* tuple: the handles of levels 1..depth-1 */
    int64_t index, depth;
    int64_t rec[MAX_DEPTH];
    int64_t idx[MAX_DEPTH];
} CounterObject;

/* What a level step returns. */
enum { LEVEL_OK = 0, LEVEL_REFUSED = 1, LEVEL_OVERFLOW = 2 };

/*
 * propagate_protected_usage(c, usage): keep parent->children_{min,low}_usage equal
 * to the sum over children of min(usage, setting). Cheap read first; the exchange
 * makes concurrent propagations of one counter add their deltas exactly once.
 */
static inline void
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
        STORE_REL(&c[PC_WATERMARK], usage);
}

/*
 * contrib[row][counter]: what this row's owner has added to the counter's usage,
 * net. Written only by the row's owner (or by the repair once it is dead), so a
 * plain read-modify-write is exact; a release store, after the usage change it
 * records. At quiescence usage == sum of contrib over rows (I7); a kill between a
 * usage change and its contrib update leaves a residue the repair finds
 * (stop_machine.py).
 */
static inline void
contrib_add(int64_t *k, int64_t delta)
{
    STORE_REL(k, LOAD(k) + delta);
}

/*
 * One level of page_counter_try_charge (check_max) or page_counter_charge: add nr
 * to record c's usage and to contrib word k. Speculative add, then compare: the add
 * is a full barrier before max is read, so either we see a concurrent set_max's new
 * limit, or set_max re-reads usage after its exchange and sees our add
 * (page_counter.set_max). LEVEL_REFUSED: max refused, the add undone, failcnt + 1
 * (exactly: one atomic add, unlike the kernel's racy ++). LEVEL_OVERFLOW: the usage
 * would wrap past INT64_MAX (only forced charges get there), undone.
 */
static inline int
level_charge(int64_t *c, int64_t *parent, int64_t *k, int64_t nr, int check_max,
             int64_t *new_usage)
{
    int64_t new = ADD_FETCH(&c[PC_USAGE], nr);
    contrib_add(k, nr);
    if (new < -nr || (check_max && new > LOAD(&c[PC_MAX]))) {
        ADD_FETCH(&c[PC_USAGE], -nr);
        contrib_add(k, -nr);
        if (new < -nr)
            return LEVEL_OVERFLOW;
        ADD_FETCH(&c[PC_FAILCNT], 1);
        return LEVEL_REFUSED;
    }
    propagate(c, parent, new);
    bump_watermark(c, new);
    *new_usage = new;
    return LEVEL_OK;
}

/*
 * One level of page_counter_cancel: subtract nr from record c's usage and contrib
 * word k; return the new usage. Negative means an underflow (a caller bug), clamped:
 * the clamp adds our own deficit back instead of storing 0 as the kernel does (a
 * store would also erase a charge that raced in after our subtraction); overlapping
 * underflows each add back at most their own nr, so the sum is exact.
 */
static inline int64_t
level_cancel(int64_t *c, int64_t *parent, int64_t *k, int64_t nr)
{
    int64_t new = ADD_FETCH(&c[PC_USAGE], -nr);
    contrib_add(k, -nr);
    int64_t settled = new;
    if (new < 0) {
        int64_t deficit = -new < nr ? -new : nr;
        settled = ADD_FETCH(&c[PC_USAGE], deficit);
        contrib_add(k, deficit);
    }
    propagate(c, parent, settled);
    return new;
}

/* OverflowError for a charge of nr pages; returns NULL. */
static inline PyObject *
overflow(int64_t nr)
{
    PyErr_Format(PyExc_OverflowError,
                 "charging %lld pages would take a usage past 2**63 - 1", (long long)nr);
    return NULL;
}

/*
 * Enter the quiesce section of row r: in_op = 1, then read the stop word (Dekker,
 * seq_cst): the stopper stores stop, then reads every live row's in_op, so at
 * least one sees the other. Returns 1, or 0 with in_op back at 0 when a
 * stop_machine holds stop (nothing written: wait and retry). stop NULL: no
 * handshake (the stop_machine holder, acting for a dead row).
 */
static inline int
op_enter(int64_t *r, int64_t *stop)
{
    STORE(&r[R_IN_OP], 1);
    if (stop && LOAD(stop) != 0) {
        STORE_REL(&r[R_IN_OP], 0);
        return 0;
    }
    return 1;
}

/*
 * The rest of an intent record of row r, once R_BASE holds the contrib of each of
 * the `depth` levels from counter `index` (op_intent; Slots.op_begin, which walks
 * the parent words): the counter, the depth, the stock word and its value, no
 * forward plan, then op = 1 last.
 */
static inline void
op_seal(int64_t *r, int64_t index, int64_t depth, int64_t stock_slot, int64_t *stock)
{
    STORE_REL(&r[R_COUNTER], index);
    STORE_REL(&r[R_DEPTH], depth);
    STORE_REL(&r[R_STOCK_SLOT], stock_slot);
    int64_t before = stock ? LOAD(&stock[STOCK_NR]) : 0;
    STORE_REL(&r[R_STOCK_BEFORE], before);
    STORE_REL(&r[R_STOCK_AFTER], before);       /* a lockless slot: no CAS intended */
    STORE_REL(&r[R_FWD_LEVELS], 0);
    STORE_REL(&r[R_OP], 1);
}

/*
 * The intent record of an op of row r on the handle's path, which may change
 * stock word `stock_slot` (-1: none; stock: its pointer): contrib of every level,
 * the counter, the depth, the stock word and its value, then op = 1 last. From
 * here a kill is rolled back to exactly this snapshot (stop_machine.py).
 */
static inline void
op_intent(SlotsObject *s, int64_t *r, CounterObject *co, int64_t stock_slot,
          int64_t *stock)
{
    int64_t *contrib = s->words + s->contrib;
    for (int64_t level = 0; level < co->depth; level++)
        STORE_REL(&r[R_BASE + level], LOAD(&contrib[co->idx[level]]));
    op_seal(r, co->index, co->depth, stock_slot, stock);
}

/*
 * Mark the op of row r forward (see the top): its plan is delta at each of its
 * first `levels` levels, and its stock word (if it names one) ending at
 * stock_after. The plan's words first, the level count last: a kill before it
 * leaves a rollback op. Call it before the op's first decrease of a usage, once
 * the stock word holds stock_after or will hold it whatever happens (its lock
 * held, or its CPU this process or dead).
 */
static inline void
op_forward(int64_t *r, int64_t delta, int64_t levels, int64_t stock_after)
{
    STORE_REL(&r[R_FWD_DELTA], delta);
    STORE_REL(&r[R_STOCK_AFTER], stock_after);
    STORE_REL(&r[R_FWD_LEVELS], levels);
}

/* The op is complete (op = 0), then leave the quiesce section (in_op = 0). */
static inline void
op_leave(int64_t *r)
{
    STORE_REL(&r[R_OP], 0);
    STORE_REL(&r[R_IN_OP], 0);
}

/*
 * This process's writer row (Slots.set_writer), if an op of it can begin here:
 * NULL when Python must take over (no row yet, or an op of another thread of ours
 * in progress: it holds the op lock of writer.py, between two of its steps).
 */
static inline int64_t *
writer_row(SlotsObject *s)
{
    if (s->row < 0)
        return NULL;
    int64_t *r = s->words + s->row;
    return LOAD(&r[R_OP]) ? NULL : r;
}

/* op_enter with the arena's stop word (a bare buffer has none: no handshake). */
static inline int
op_enter_arena(SlotsObject *s, int64_t *r)
{
    return op_enter(r, s->stop >= 0 ? s->words + s->stop : NULL);
}

/* The exclusive bound on any page amount passed in (the public API contract). */
#define NR_LIMIT (1LL << 62)

/*
 * The n of an op, checked exactly as page_counter.check_nr does: an int (not a
 * bool, not an int subclass) in [0, 2**62). 0, or -1 with its TypeError or
 * ValueError.
 */
static inline int
check_nr(PyObject *n, int64_t *out)
{
    if (PyLong_CheckExact(n)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(n, &overflow);
        if (!overflow && v >= 0 && v < NR_LIMIT) {
            *out = v;
            return 0;
        }
    }
    PyObject *tname = PyType_GetName(Py_TYPE(n));
    if (tname) {
        PyErr_Format(PyLong_CheckExact(n) ? PyExc_ValueError : PyExc_TypeError,
                     "n must be an int in [0, 2**62), got %R (%U)", n, tname);
        Py_DECREF(tname);
    }
    return -1;
}

/* One more walk up the hierarchy (a statistic of the row, written by its owner). */
static inline void
count_walk(int64_t *r)
{
    STORE_REL(&r[R_WALKS], LOAD(&r[R_WALKS]) + 1);
}

/*
 * Charge nr at every level of the handle's path, bottom up (check_max: try_charge;
 * else forced), inside an op of this process's row. Returns -1, or the level that
 * refused with the levels below it cancelled; *status says LEVEL_REFUSED or
 * LEVEL_OVERFLOW (the caller rolls the op back and raises).
 */
static inline int
path_charge(SlotsObject *s, CounterObject *co, int64_t nr, int check_max, int *status)
{
    int64_t *w = s->words, *contrib = s->words + s->contrib, new;
    count_walk(w + s->row);
    for (int level = 0; level < co->depth; level++) {
        int64_t *parent = level + 1 < co->depth ? w + co->rec[level + 1] : NULL;
        *status = level_charge(w + co->rec[level], parent, &contrib[co->idx[level]], nr,
                               check_max, &new);
        if (*status != LEVEL_OK) {
            for (int below = 0; below < level; below++)
                level_cancel(w + co->rec[below], w + co->rec[below + 1],
                             &contrib[co->idx[below]], nr);
            return level;
        }
    }
    return -1;
}

/*
 * Cancel nr at the first `depth` levels of the handle's path, inside an op of this
 * process's row. Returns the number of levels that underflowed; the first
 * MAX_DEPTH of them go to level[] and new[] (the level, its usage before the clamp).
 */
static inline int
path_cancel(SlotsObject *s, CounterObject *co, int64_t nr, int64_t depth, int *level,
            int64_t *new)
{
    int64_t *w = s->words, *contrib = s->words + s->contrib;
    int under = 0;
    if (nr == 0)
        return 0;
    if (depth == co->depth)
        count_walk(w + s->row);
    for (int l = 0; l < depth; l++) {
        int64_t *parent = l + 1 < co->depth ? w + co->rec[l + 1] : NULL;
        int64_t after = level_cancel(w + co->rec[l], parent, &contrib[co->idx[l]], nr);
        if (after < 0) {
            level[under] = l;
            new[under++] = after;
        }
    }
    return under;
}

/* Re-propagate the protected usage of every level of the path from its usage
 * (after a rollback changed usages behind the level steps' backs). */
static inline void
path_propagate(SlotsObject *s, CounterObject *co)
{
    int64_t *w = s->words;
    for (int l = 0; l + 1 < co->depth; l++)
        propagate(w + co->rec[l], w + co->rec[l + 1], LOAD(&w[co->rec[l] + PC_USAGE]));
}

/*
 * ---- The lockless stock (v4) -------------------------------------------------
 *
 * A counter with PC_FLAG_LOCKLESS keeps, per CPU, one word = seq << 34 | pages
 * (_slots.h) and, next to it, last. Nothing locks it:
 *
 *   hit      the CPU: CAS(w -> w - n) while pages(w) >= n. No op: no usage
 *            changes, and a kill leaves the CAS done or not.
 *   deposit  the CPU, inside its charge op, after the walk: for each attempt,
 *            intent R_STOCK_BEFORE = E (the word read), R_STOCK_AFTER = E + d
 *            (d the surplus, > 0), then CAS(E -> E + d); once it succeeds,
 *            op_forward(charge, depth, E + d): the op counts wholly.
 *   take     (PC_FLAG_CAP) the CPU, in place of a deposit that would leave more
 *            than batch pages: intent E and seq(E) << 34, FWD_DELTA the net
 *            charge - d - pages(E), then CAS; once it succeeds, op_forward, and
 *            the op uncharges d + pages(E).
 *   drain    any process, inside an op of its own row (or, in hotplug, of the
 *            dead CPU's row) on the counter's path, holding the arena's drain
 *            lock: R_STOCK_AFTER = (seq(W) + 1) << 34, then for each attempt
 *            R_STOCK_BEFORE = W, CAS(W -> R_STOCK_AFTER); once it succeeds,
 *            last = W, op_forward(-pages(W), depth, R_STOCK_AFTER), then the
 *            uncharge walk.
 *
 * Only drains change seq, and only the CPU adds pages. A repair (of a dead
 * writer, or op_abort) never writes the word: a live CPU may have changed it
 * since. It decides from the word whether the op's CAS happened (v4_outcome).
 */
enum { V4_NONE = 0, V4_DEPOSITED = 1, V4_DRAINED = 2 };

static inline int64_t v4_pages(int64_t w) { return w & V4_PAGES_MASK; }
static inline int64_t v4_seq(int64_t w) { return (w >> V4_PAGES_BITS) % V4_SEQ_MOD; }
static inline int64_t v4_drained(int64_t w) {
    return ((v4_seq(w) + 1) % V4_SEQ_MOD) << V4_PAGES_BITS;
}

/* The hit: take nr pages from the word if it holds them (1), else 0. */
static inline int
v4_consume(int64_t *stock, int64_t nr)
{
    int64_t w = LOAD(&stock[STOCK_NR]);
    while (v4_pages(w) >= nr) {
        if (__atomic_compare_exchange_n(&stock[STOCK_NR], &w, w - nr, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

/*
 * The deposit of d > 0 surplus pages of a charge of `charge` pages, inside the
 * charge op of row r (its walk complete, `depth` levels): the CAS loop above,
 * then the forward mark. With `capped` (PC_FLAG_CAP, series E14), a word whose
 * pages would exceed `charge` (the batch: a second context of this CPU deposited
 * in between) is taken instead, as the old refill_stock drained a slot above the
 * batch: intent E and seq(E) << 34 (seq unchanged: the CPU removes pages, as a
 * hit does), FWD_DELTA charge - d - pages(E) recorded before each CAS; once it
 * succeeds, the forward mark, and the caller uncharges d + pages(E). Returns the
 * pages the caller must still uncharge: 0 (deposited), d + pages(E) (taken), or d
 * having changed no word and marked nothing when pages would reach 2**34.
 */
static inline int64_t
v4_deposit(int64_t *r, int64_t *stock, int64_t d, int64_t charge, int64_t depth, int capped)
{
    int64_t e, a, delta;
    do {
        e = LOAD(&stock[STOCK_NR]);
        if (capped && v4_pages(e) + d > charge) {
            a = e - v4_pages(e);
            delta = charge - d - v4_pages(e);
        } else if (v4_pages(e) + d > V4_PAGES_MASK) {
            return d;
        } else {
            a = e + d;
            delta = charge;
        }
        STORE_REL(&r[R_FWD_DELTA], delta);
        STORE_REL(&r[R_STOCK_BEFORE], e);
        STORE_REL(&r[R_STOCK_AFTER], a);
    } while (!cas_strong(&stock[STOCK_NR], e, a));
    op_forward(r, delta, depth, a);
    return charge - delta;
}

/*
 * A drain's take, inside an op of row r on the counter's path (`depth` levels)
 * naming lockless word `stock`, the drain lock held (or under stop_machine): the
 * CAS loop above, then last = the word taken and the forward mark. Returns the
 * pages taken (0: none, nothing written but the intent); the caller uncharges
 * them.
 */
static inline int64_t
v4_drain_take(int64_t *r, int64_t *stock, int64_t depth)
{
    int64_t w = LOAD(&stock[STOCK_NR]), after;
    do {
        if (v4_pages(w) == 0)
            return 0;
        after = v4_drained(w);
        STORE_REL(&r[R_STOCK_AFTER], after);
        STORE_REL(&r[R_STOCK_BEFORE], w);
    } while (!__atomic_compare_exchange_n(&stock[STOCK_NR], &w, after, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    STORE_REL(&stock[STOCK_LAST], w);
    op_forward(r, -v4_pages(w), depth, after);
    return v4_pages(w);
}

/*
 * Did the CAS that row r's intent names on lockless word `stock` happen? Read by
 * a repair that holds every other writer of the word still (stop_machine, with
 * the dead drains' `last` put right first; or op_abort of a drain, which holds the
 * drain lock). B = R_STOCK_BEFORE, A = R_STOCK_AFTER, w = the word now.
 *
 *   A == v4_drained(B): a drain of B. Its CAS is the only change of seq since B
 *     was read (drains are serialised by the drain lock, and a dead drainer is
 *     repaired before the lock is taken over): it happened iff seq(w) == seq(A).
 *   seq(A) == seq(B), pages(A) > pages(B): a deposit of d = A - B. Since B was
 *     read only drains changed the word (the CPU is in this op: its hits wait).
 *     seq(w) == seq(B): no drain since; w is B or A: it happened iff w == A.
 *     Else a drain took pages after B was read, and after it the word held 0
 *     pages, which nobody but this CPU (in this op, or dead) could raise: exactly
 *     one drain took pages, and it took A iff the deposit happened first:
 *     it happened iff last == A.
 *   seq(A) == seq(B), pages(A) == 0 < pages(B): the cap's take of B by the CPU.
 *     Since B was read only drains changed the word, each bumping seq, and none
 *     takes a word of 0 pages: it happened iff w == A. Completed like a deposit,
 *     to FWD_DELTA (recorded with B and A).
 *   Anything else (A == B: no CAS was about to happen; or A from an earlier,
 *     failed attempt: that CAS failed and B's was not tried): V4_NONE.
 */
static inline int
v4_outcome(int64_t *r, int64_t *stock)
{
    int64_t b = LOAD(&r[R_STOCK_BEFORE]), a = LOAD(&r[R_STOCK_AFTER]);
    int64_t w = LOAD(&stock[STOCK_NR]);
    if (a == v4_drained(b) && v4_pages(b) > 0)
        return v4_seq(w) == v4_seq(a) ? V4_DRAINED : V4_NONE;
    if (v4_seq(a) == v4_seq(b) && v4_pages(a) == 0 && v4_pages(b) > 0)
        return w == a ? V4_DEPOSITED : V4_NONE;
    if (v4_seq(a) == v4_seq(b) && v4_pages(a) > v4_pages(b)) {
        if (v4_seq(w) == v4_seq(b))
            return w == a ? V4_DEPOSITED : V4_NONE;
        return LOAD(&stock[STOCK_LAST]) == a ? V4_DEPOSITED : V4_NONE;
    }
    return V4_NONE;
}

#endif /* SHMCOUNTER_OP_H */
