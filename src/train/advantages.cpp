// Group statistics per prompt, then the scheme's formula per sample, then the filters as a keep mask.
// Formulas and the reasons behind each choice: docs/ALGORITHMS.md.
#include "train/advantages.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "core/error.h"

namespace rlaif::train {

double median(std::vector<double> v) {
  RLAIF_CHECK(!v.empty(), "median of nothing");
  const size_t n = v.size(), mid = n / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double hi = v[mid];
  if (n % 2 == 1) return hi;
  const double lo = *std::max_element(v.begin(), v.begin() + mid);
  return 0.5 * (lo + hi);
}

namespace {

// Advantages of one group's rewards under the group scheme (mean or leave-one-out baseline, optional std).
std::vector<double> group_scheme(const std::vector<double>& r, const AdvantageOptions& o) {
  const double n = static_cast<double>(r.size());
  const double sum = std::accumulate(r.begin(), r.end(), 0.0);
  const double mean = sum / n;
  double var = 0;
  for (double x : r) var += (x - mean) * (x - mean);
  const double std = r.size() > 1 ? std::sqrt(var / (n - 1)) : 0.0;
  std::vector<double> a(r.size());
  for (size_t i = 0; i < r.size(); ++i) {
    double b = 0;
    if (o.baseline == AdvantageOptions::Baseline::kMean) b = mean;
    // Leave-one-out (RLOO): the mean of the OTHER samples, so the baseline is independent of the sample itself.
    if (o.baseline == AdvantageOptions::Baseline::kLeaveOneOut) b = r.size() > 1 ? (sum - r[i]) / (n - 1) : r[i];
    a[i] = r[i] - b;
    // A zero scale (one sample, or equal rewards with eps 0) leaves r - b as is rather than making 0/0.
    if (o.normalize_std && std + o.eps > 0) a[i] /= std + o.eps;
  }
  return a;
}

// The original system's robust scheme: tanh((r - median) / (1.4826 * MAD + eps)), bounded in (-1, 1).
std::vector<double> mad_tanh_scheme(const std::vector<double>& r, const AdvantageOptions& o) {
  const double med = median(r);
  std::vector<double> dev(r.size());
  for (size_t i = 0; i < r.size(); ++i) dev[i] = std::abs(r[i] - med);
  const double scale = kMadToStd * median(dev) + o.eps;
  std::vector<double> a(r.size());
  for (size_t i = 0; i < r.size(); ++i) {
    const double d = r[i] - med;
    a[i] = scale > 0 ? std::tanh(d / scale) : (d > 0) - (d < 0);  // scale 0: the limit of tanh(d / scale)
  }
  return a;
}

}  // namespace

AdvantageResult compute_advantages(const std::vector<double>& rewards, const std::vector<int64_t>& group_of_sample,
                                   const AdvantageOptions& o) {
  RLAIF_CHECK(rewards.size() == group_of_sample.size(), "{} rewards for {} group ids", rewards.size(),
              group_of_sample.size());
  RLAIF_CHECK(o.eps >= 0, "eps {}", o.eps);
  RLAIF_CHECK(!o.top_samples_per_prompt || *o.top_samples_per_prompt >= 1, "top_samples_per_prompt {}",
              *o.top_samples_per_prompt);
  for (double r : rewards) RLAIF_CHECK(std::isfinite(r), "non-finite reward {}", r);

  std::map<int64_t, std::vector<size_t>> groups;  // group id -> sample indices, in sample order
  for (size_t i = 0; i < rewards.size(); ++i) groups[group_of_sample[i]].push_back(i);

  AdvantageResult res;
  res.advantages.assign(rewards.size(), 0.0);
  res.keep.assign(rewards.size(), true);
  res.num_groups = static_cast<int64_t>(groups.size());
  for (const auto& [id, idx] : groups) {
    std::vector<double> r(idx.size());
    for (size_t j = 0; j < idx.size(); ++j) r[j] = rewards[idx[j]];
    const auto [lo, hi] = std::minmax_element(r.begin(), r.end());
    const bool zero_variance = *hi - *lo <= kZeroVarianceTol;
    if (zero_variance) ++res.zero_variance_groups;

    const std::vector<double> a =
        o.scheme == AdvantageOptions::Scheme::kMadTanh ? mad_tanh_scheme(r, o) : group_scheme(r, o);
    for (size_t j = 0; j < idx.size(); ++j) res.advantages[idx[j]] = a[j];

    if (zero_variance && o.drop_zero_variance) {
      for (size_t i : idx) res.keep[i] = false;
      continue;
    }
    if (o.reward_threshold) {
      for (size_t i : idx)
        if (rewards[i] < *o.reward_threshold) res.keep[i] = false, ++res.dropped_by_threshold;
    }
    if (o.top_samples_per_prompt) {
      // Best first; stable so that equal rewards keep the earlier sample.
      std::vector<size_t> order = idx;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rewards[a] > rewards[b]; });
      for (size_t k = static_cast<size_t>(*o.top_samples_per_prompt); k < order.size(); ++k)
        if (res.keep[order[k]]) res.keep[order[k]] = false, ++res.dropped_by_top_k;
    }
  }
  res.kept = std::count(res.keep.begin(), res.keep.end(), true);
  return res;
}

}  // namespace rlaif::train
