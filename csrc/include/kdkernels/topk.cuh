// Per-row running top-k (docs/semantics.md, "linear_topk").
//
// Order: (value descending, id ascending) -- a total order on (value, id) pairs, so the result does
// not depend on the order in which candidates arrive (chunks, threads). NaN values never enter.
// A row's state is k (value, id) pairs sorted best first; empty slots hold (-inf, kNoId), which every
// real candidate beats (even a -inf logit, since its id is smaller).
//
// Memory: reads and writes the row's 2k state entries.
#pragma once

#include "numeric.cuh"

namespace kdkernels {

constexpr int64_t kNoId = INT64_MAX;

template <class F>
KD_HD bool ranks_before(F v1, int64_t i1, F v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// Insert (v, id) into the sorted row state if it ranks before the last entry. O(k) worst case.
template <class F>
KD_HD void topk_insert(F* vals, int64_t* ids, int64_t k, F v, int64_t id) {
  if (v != v || !ranks_before(v, id, vals[k - 1], ids[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && ranks_before(v, id, vals[pos - 1], ids[pos - 1])) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = v;
  ids[pos] = id;
}

}  // namespace kdkernels
