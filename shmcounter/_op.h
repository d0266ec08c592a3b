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
    STORE_REL(&r[R_COUNTER], co->index);
    STORE_REL(&r[R_DEPTH], co->depth);
    STORE_REL(&r[R_STOCK_SLOT], stock_slot);
    STORE_REL(&r[R_STOCK_BEFORE], stock ? LOAD(&stock[STOCK_NR]) : 0);
    STORE_REL(&r[R_FWD_LEVELS], 0);
    STORE_REL(&r[R_OP], 1);
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

#endif /* SHMCOUNTER_OP_H */
