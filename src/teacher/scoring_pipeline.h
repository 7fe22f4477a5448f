// Scoring beside generation: one worker thread owns a Scorer's calls while a step's batches (one prompt's samples
// each) are handed over as they finish decoding, so the teacher's latency hides under the rest of the rollout.
// Results stay keyed to their requests' ids; the worker never touches the model, only strings and the Scorer.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "teacher/scorer.h"

namespace rlaif::teacher {

class ScoringPipeline {
 public:
  using Clock = std::chrono::steady_clock;
  // One Scorer::score() call of the worker: the batches it held (submission indices) and when it ran.
  struct Call {
    std::vector<size_t> batches;
    Clock::time_point start, end;
  };

  // Starts the worker. The scorer must not be used elsewhere until finish() returns or the pipeline is destroyed.
  explicit ScoringPipeline(Scorer& scorer);
  // Stops the worker after its current call (batches not yet scored are dropped) and joins it.
  ~ScoringPipeline();
  ScoringPipeline(const ScoringPipeline&) = delete;
  ScoringPipeline& operator=(const ScoringPipeline&) = delete;

  // Queues one batch; returns its index (0, 1, ... in submission order). Whenever the worker is free it scores
  // every batch queued so far in one call, so the API client keeps as many requests in flight as it can.
  size_t submit(std::vector<ScoreRequest> rows);
  // Waits until every submitted batch is scored and stops the worker; results per batch, in its rows' order.
  // Rethrows the scorer's exception, if any. Call once; submit() is not allowed afterwards.
  std::vector<std::vector<ScoreResult>> finish();

  // After finish(): the stats summed over the worker's calls (the whole step), and the calls themselves.
  const ScoringStats& stats() const { return stats_; }
  const std::vector<Call>& calls() const { return calls_; }

 private:
  void work();

  Scorer& scorer_;
  std::mutex m_;
  std::condition_variable wake_;
  std::vector<std::vector<ScoreRequest>> queued_;  // batches not yet taken by the worker
  size_t submitted_ = 0, taken_ = 0;
  bool closing_ = false, stopping_ = false, finished_ = false;
  std::exception_ptr error_;
  std::vector<std::vector<ScoreResult>> results_;  // by batch index
  ScoringStats stats_;
  std::vector<Call> calls_;
  std::thread worker_;  // last: started once every member above exists
};

// Seconds of the calls' run time inside [from, to] (the calls never overlap each other: one worker runs them).
double overlap_seconds(const std::vector<ScoringPipeline::Call>& calls, ScoringPipeline::Clock::time_point from,
                       ScoringPipeline::Clock::time_point to);

}  // namespace rlaif::teacher
