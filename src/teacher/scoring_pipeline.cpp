// Scoring worker implementation (see scoring_pipeline.h). One mutex guards the queue, results and stats; the
// Scorer runs outside it, so submit() never waits for the teacher.
#include "teacher/scoring_pipeline.h"

#include <algorithm>

#include "core/error.h"

namespace rlaif::teacher {

ScoringPipeline::ScoringPipeline(Scorer& scorer) : scorer_(scorer), worker_([this] { work(); }) {}

ScoringPipeline::~ScoringPipeline() {
  if (!worker_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(m_);
    stopping_ = true;
  }
  wake_.notify_all();
  worker_.join();
}

size_t ScoringPipeline::submit(std::vector<ScoreRequest> rows) {
  size_t index;
  {
    std::lock_guard<std::mutex> l(m_);
    RLAIF_CHECK(!closing_, "ScoringPipeline::submit after finish()");
    index = submitted_++;
    queued_.push_back(std::move(rows));
    results_.emplace_back();
  }
  wake_.notify_all();
  return index;
}

std::vector<std::vector<ScoreResult>> ScoringPipeline::finish() {
  {
    std::lock_guard<std::mutex> l(m_);
    RLAIF_CHECK(!finished_, "ScoringPipeline::finish called twice");
    closing_ = finished_ = true;
  }
  wake_.notify_all();
  worker_.join();  // the worker drains the queue, then returns
  if (error_) std::rethrow_exception(error_);
  RLAIF_CHECK(taken_ == submitted_, "scoring worker stopped with {} of {} batches scored", taken_, submitted_);
  return std::move(results_);
}

void ScoringPipeline::work() {
  std::unique_lock<std::mutex> l(m_);
  for (;;) {
    wake_.wait(l, [&] { return stopping_ || closing_ || !queued_.empty(); });
    if (stopping_ || queued_.empty()) return;  // stopped, or closing with nothing left
    // Everything queued so far goes into one call.
    std::vector<std::vector<ScoreRequest>> batches = std::move(queued_);
    queued_.clear();
    const size_t first = taken_;
    taken_ += batches.size();
    l.unlock();

    std::vector<ScoreRequest> rows;
    for (auto& b : batches) rows.insert(rows.end(), std::make_move_iterator(b.begin()), std::make_move_iterator(b.end()));
    Call call;
    call.start = Clock::now();
    std::vector<ScoreResult> out;
    ScoringStats st;
    try {  // nothing may escape the thread: every failure goes to finish()
      out = scorer_.score(rows);
      st = scorer_.step_stats();
      RLAIF_CHECK(out.size() == rows.size(), "scorer returned {} results for {} rows", out.size(), rows.size());
    } catch (...) {
      l.lock();
      error_ = std::current_exception();
      return;  // finish() rethrows it; later batches stay unscored
    }
    call.end = Clock::now();

    l.lock();
    size_t pos = 0;
    for (size_t b = 0; b < batches.size(); ++b) {
      auto& dst = results_[first + b];
      dst.assign(std::make_move_iterator(out.begin() + static_cast<std::ptrdiff_t>(pos)),
                 std::make_move_iterator(out.begin() + static_cast<std::ptrdiff_t>(pos + batches[b].size())));
      pos += batches[b].size();
      call.batches.push_back(first + b);
    }
    stats_.add(st);
    calls_.push_back(std::move(call));
  }
}

double overlap_seconds(const std::vector<ScoringPipeline::Call>& calls, ScoringPipeline::Clock::time_point from,
                       ScoringPipeline::Clock::time_point to) {
  double s = 0;
  for (const auto& c : calls) {
    const auto a = std::max(c.start, from), b = std::min(c.end, to);
    if (b > a) s += std::chrono::duration<double>(b - a).count();
  }
  return s;
}

}  // namespace rlaif::teacher
