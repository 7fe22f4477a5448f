// Client-side rate limits: requests per window and tokens per window. A sliding-window log (a token bucket
// whose tokens come back exactly one window after they were spent) so that NO window of the server's clock
// ever sees more than the limit, which a refill-rate bucket with a full burst cannot promise.
#pragma once

#include <chrono>
#include <deque>
#include <utility>

namespace rlaif::teacher {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  // limit <= 0 disables that bucket. `window_s` is 60 for per-minute limits.
  RateLimiter(double requests_per_window, double tokens_per_window, double window_s);

  // Time at which a request costing `tokens` may start (now if it fits). A request larger than the whole
  // token budget is let through alone once the window is empty, rather than never.
  Clock::time_point next_allowed(double tokens, Clock::time_point now);
  // Records that a request costing `tokens` starts at `now`.
  void record(double tokens, Clock::time_point now);

 private:
  void expire(Clock::time_point now);
  double max_requests_, max_tokens_;
  Clock::duration window_;
  std::deque<std::pair<Clock::time_point, double>> sent_;  // (start time, tokens) inside the window
  double tokens_in_window_ = 0;
};

}  // namespace rlaif::teacher
