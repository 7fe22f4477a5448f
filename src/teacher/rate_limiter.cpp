// Sliding-window limiter implementation (see rate_limiter.h for why not a refill-rate bucket).
#include "teacher/rate_limiter.h"

#include <algorithm>

namespace rlaif::teacher {

RateLimiter::RateLimiter(double requests_per_window, double tokens_per_window, double window_s)
    : max_requests_(requests_per_window), max_tokens_(tokens_per_window) {
  // Headroom for network jitter between our send time and the server's arrival time.
  const double padded = window_s + std::max(0.01 * window_s, 0.05);
  window_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(padded));
}

void RateLimiter::expire(Clock::time_point now) {
  while (!sent_.empty() && sent_.front().first + window_ <= now) {
    tokens_in_window_ -= sent_.front().second;
    sent_.pop_front();
  }
  if (sent_.empty()) tokens_in_window_ = 0;  // no float drift across long runs
}

RateLimiter::Clock::time_point RateLimiter::next_allowed(double tokens, Clock::time_point now) {
  expire(now);
  Clock::time_point at = now;
  if (max_requests_ > 0 && static_cast<double>(sent_.size()) + 1 > max_requests_) {
    // The oldest entries must leave until one more request fits.
    const size_t must_leave = sent_.size() + 1 - static_cast<size_t>(max_requests_);
    at = std::max(at, sent_[must_leave - 1].first + window_);
  }
  if (max_tokens_ > 0 && tokens_in_window_ + tokens > max_tokens_) {
    double left = tokens_in_window_;
    Clock::time_point t = now;
    for (const auto& [start, n] : sent_) {
      left -= n;
      t = start + window_;
      if (left + tokens <= max_tokens_) break;
    }
    at = std::max(at, t);  // if it never fits, t is when the window is empty
  }
  return at;
}

void RateLimiter::record(double tokens, Clock::time_point now) {
  expire(now);
  sent_.emplace_back(now, tokens);
  tokens_in_window_ += tokens;
}

}  // namespace rlaif::teacher
