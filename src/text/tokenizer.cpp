// Byte-level BPE as HF `tokenizers` runs it (added tokens -> NFC -> Split/Digits/ByteLevel pre-tokenizers ->
// BPE by merge rank) and llama.cpp's SentencePiece bigram algorithm. Regexes are HF's own patterns compiled
// by PCRE2 (UTF+UCP+JIT), with \s rewritten to Unicode White_Space, which is what HF's Oniguruma uses.
#include "text/tokenizer.h"
#include "text/utf8.h"

#include <algorithm>
#include <array>
#include <functional>
#include <cstring>
#include <fstream>
#include <mutex>
#include <queue>
#include <unordered_map>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/gguf.h"
#include "core/io.h"

namespace rlaif {

using nlohmann::json;

namespace {

// HF's pre-tokenizer patterns. llama.cpp's "qwen2" spells the (?i:) group out by case; same strings match.
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwenRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Unicode White_Space: Oniguruma's \s. PCRE2's \s with UCP also takes U+180E, so \s is spelled out.
constexpr std::string_view kWhiteSpace = R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

[[noreturn]] void fail(const std::string& msg, const std::string& hint = "") { throw Error("tokenizer", msg, hint); }

// Length of the valid UTF-8 sequence at s[i], or 0 if the bytes there are not valid UTF-8 (overlong forms,
// surrogates and code points past U+10FFFF are invalid, as in Rust's str).
size_t utf8_valid_len(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) n = 2, cp = c & 0x1F;
  else if (c >= 0xE0 && c <= 0xEF) n = 3, cp = c & 0x0F;
  else if (c >= 0xF0 && c <= 0xF4) n = 4, cp = c & 0x07;
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
    return 0;
  return n;
}

uint32_t utf8_decode(std::string_view s, size_t i, size_t n) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (n == 1) return c;
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to U+0100 onwards.
const std::array<uint32_t, 256>& byte_to_unicode() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

std::string nfc_normalize(std::string_view s) {
  bool ascii = true;
  for (char c : s) ascii &= static_cast<unsigned char>(c) < 0x80;
  if (ascii) return std::string(s);
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                              &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) fail(fmt::format("NFC normalization failed: {}", utf8proc_errmsg(n)));
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

// A PCRE2 pattern compiled once; match data is per call so encode() stays thread-safe.
class Regex {
 public:
  explicit Regex(std::string_view hf_pattern) {
    const std::string pat = translate(hf_pattern);
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      fail(fmt::format("cannot compile pre-tokenizer regex '{}' at {}: {}", hf_pattern, off, reinterpret_cast<char*>(buf)));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(begin, end) for every match in s (valid UTF-8), left to right, like Rust's find_iter.
  template <typename F>
  void for_each_match(std::string_view s, pcre2_match_data* md, F&& f) const {
    size_t pos = 0;
    while (pos <= s.size()) {
      const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
      const int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), pos, 0, md, nullptr)
                          : pcre2_match(code_, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step one character, as find_iter does
        if (b >= s.size()) break;
        pos = b + std::max<size_t>(1, utf8_valid_len(s, b));
        continue;
      }
      f(b, e);
      pos = e;
    }
  }
  pcre2_match_data* new_match_data() const { return pcre2_match_data_create_from_pattern(code_, nullptr); }

 private:
  // \s and \S -> explicit White_Space classes (inside [...] only \s can be inlined).
  static std::string translate(std::string_view p) {
    std::string out;
    bool in_class = false;
    for (size_t i = 0; i < p.size(); ++i) {
      const char c = p[i];
      if (c == '\\' && i + 1 < p.size()) {
        const char n = p[i + 1];
        if (n == 's') out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
        else if (n == 'S' && !in_class) out += "[^" + std::string(kWhiteSpace) + "]";
        else if (n == 'S') fail(fmt::format("regex '{}': \\S inside a character class is not supported", p));
        else out += p.substr(i, 2);
        ++i;
        continue;
      }
      if (c == '[' && !in_class) in_class = true;
      else if (c == ']' && in_class) in_class = false;
      out += c;
    }
    return out;
  }
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

struct MatchData {
  explicit MatchData(const Regex& r) : md(r.new_match_data()) {}
  ~MatchData() { pcre2_match_data_free(md); }
  pcre2_match_data* md;
};

struct PreStep {
  enum Kind { kSplit, kDigits, kByteLevel } kind;
  std::shared_ptr<Regex> regex;  // kSplit, or kByteLevel with use_regex
  bool individual_digits = false;
  bool add_prefix_space = false;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip;
};

struct Piece {  // a span of text that becomes tokens, or an already-decided token
  std::string text;
  int32_t token = -1;
};

}  // namespace

struct TokenizerImpl {
  bool spm = false;
  std::vector<std::string> pieces;                 // id -> raw token string
  std::unordered_map<std::string, int32_t> vocab;  // raw token string -> id (model vocab and added tokens)
  std::vector<std::string> bytes;                  // id -> the bytes decode emits
  std::vector<uint8_t> special;                    // id -> special (skipped by decode(skip_special))
  std::vector<AddedToken> added;                   // matched in raw text before the model runs
  std::array<bool, 256> added_first{};             // first bytes of added tokens (fast scan)
  std::optional<int32_t> bos, eos, pad;
  bool add_bos = false;

  // BPE
  bool nfc = false;
  bool ignore_merges = false;
  std::vector<PreStep> pre;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left,right) -> (rank, merged id)
  std::array<int32_t, 256> byte_token{};                             // byte -> its byte-level / <0xXX> token
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  // SPM
  std::vector<float> scores;
  bool add_space_prefix = true;

  void finish();
  void split_added(std::string_view text, bool parse_special, std::vector<Piece>& out) const;
  void encode_bpe_segment(std::string_view text, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view word, std::vector<int32_t>& out) const;
  void encode_spm_segment(std::string_view text, std::vector<int32_t>& out) const;
};

namespace {

int32_t must_id(const TokenizerImpl& t, const std::string& tok, const std::string& where) {
  auto it = t.vocab.find(tok);
  if (it == t.vocab.end()) fail(fmt::format("{}: token '{}' is not in the vocabulary", where, tok));
  return it->second;
}

}  // namespace

void TokenizerImpl::finish() {
  const size_t n = pieces.size();
  bytes.assign(n, "");
  special.resize(n, 0);
  const auto& b2u = byte_to_unicode();
  std::unordered_map<uint32_t, uint8_t> u2b;
  for (int b = 0; b < 256; ++b) u2b[b2u[b]] = static_cast<uint8_t>(b);
  std::vector<uint8_t> is_added(n, 0);
  for (const auto& a : added) is_added[a.id] = 1;
  for (size_t id = 0; id < n; ++id) {
    const std::string& p = pieces[id];
    if (is_added[id]) {
      bytes[id] = p;
    } else if (spm) {
      // llama.cpp token_to_piece: <0xXX> byte tokens are that byte, ▁ is a space.
      if (p.size() == 6 && p.rfind("<0x", 0) == 0 && p[5] == '>' && byte_token[std::stoi(p.substr(3, 2), nullptr, 16)] == static_cast<int32_t>(id)) {
        bytes[id] = std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
      } else {
        std::string s;
        for (size_t i = 0; i < p.size();) {
          if (p.compare(i, 3, "\xE2\x96\x81") == 0) s += ' ', i += 3;
          else s += p[i++];
        }
        bytes[id] = s;
      }
    } else {
      // HF ByteLevel decoder: map each char back to its byte; a token with any other char stays as is.
      std::string s;
      bool ok = true;
      for (size_t i = 0; i < p.size() && ok;) {
        const size_t l = utf8_valid_len(p, i);
        if (l == 0) { ok = false; break; }
        auto it = u2b.find(utf8_decode(p, i, l));
        if (it == u2b.end()) ok = false;
        else s += static_cast<char>(it->second);
        i += l;
      }
      bytes[id] = ok ? s : p;
    }
  }
  // Longest first, so the first candidate that matches at a position is the leftmost-longest match.
  std::stable_sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  added_first.fill(false);
  for (const auto& a : added) {
    if (a.content.empty()) continue;
    added_first[static_cast<unsigned char>(a.content[0])] = true;
    if (a.special) special[a.id] = 1;
  }
}

// Splits raw text on added tokens (leftmost-longest, as HF's aho-corasick does), honouring lstrip/rstrip.
void TokenizerImpl::split_added(std::string_view text, bool parse_special, std::vector<Piece>& out) const {
  size_t seg_start = 0, i = 0;
  while (i < text.size()) {
    if (!added_first[static_cast<unsigned char>(text[i])]) { ++i; continue; }
    const AddedToken* hit = nullptr;
    for (const auto& a : added) {
      if (a.special && !parse_special) continue;
      if (text.compare(i, a.content.size(), a.content) == 0) { hit = &a; break; }
    }
    if (!hit) { ++i; continue; }
    size_t b = i, e = i + hit->content.size();
    if (hit->lstrip) {
      while (b > seg_start) {  // absorb White_Space to the left
        size_t k = b - 1;
        while (k > seg_start && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        const size_t l = utf8_valid_len(text, k);
        if (l == 0 || k + l != b || !is_white_space(utf8_decode(text, k, l))) break;
        b = k;
      }
    }
    if (hit->rstrip) {
      while (e < text.size()) {
        const size_t l = utf8_valid_len(text, e);
        if (l == 0 || !is_white_space(utf8_decode(text, e, l))) break;
        e += l;
      }
    }
    if (b > seg_start) out.push_back({std::string(text.substr(seg_start, b - seg_start)), -1});
    out.push_back({std::string(), hit->id});
    seg_start = i = e;
  }
  if (seg_start < text.size()) out.push_back({std::string(text.substr(seg_start)), -1});
}

// BPE of one pre-token: lowest merge rank first, leftmost on ties (HF's heap order), cached per word.
void TokenizerImpl::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    std::string mapped;
    for (unsigned char c : word) append_utf8(mapped, byte_to_unicode()[c]);
    auto it = vocab.find(mapped);
    if (it != vocab.end()) { out.push_back(it->second); return; }
  }
  const bool cacheable = word.size() < 256;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(std::string(word));
    if (it != cache.end()) { out.insert(out.end(), it->second.begin(), it->second.end()); return; }
  }
  struct Sym { int32_t id; int32_t prev, next; };
  std::vector<Sym> syms;
  syms.reserve(word.size());
  for (unsigned char c : word) {
    if (byte_token[c] < 0) continue;  // not in the vocab and no unk token: HF drops the char
    const auto i = static_cast<int32_t>(syms.size());
    syms.push_back({byte_token[c], i - 1, i + 1});
  }
  if (!syms.empty()) syms.back().next = -1;
  auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  struct Cand { int32_t rank, pos, new_id; };
  auto worse = [](const Cand& x, const Cand& y) { return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos; };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  for (size_t i = 0; i + 1 < syms.size(); ++i)
    if (const auto* m = lookup(syms[i].id, syms[i + 1].id)) heap.push({m->first, static_cast<int32_t>(i), m->second});
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& left = syms[c.pos];
    if (left.id < 0 || left.next < 0) continue;  // merged away, or nothing on its right any more
    Sym& right = syms[left.next];
    const auto* m = lookup(left.id, right.id);
    if (!m || m->second != c.new_id || m->first != c.rank) continue;  // stale candidate
    left.id = c.new_id;
    right.id = -1;
    left.next = right.next;
    if (right.next >= 0) syms[right.next].prev = c.pos;
    if (left.prev >= 0)
      if (const auto* pm = lookup(syms[left.prev].id, left.id)) heap.push({pm->first, left.prev, pm->second});
    if (left.next >= 0)
      if (const auto* nm = lookup(left.id, syms[left.next].id)) heap.push({nm->first, c.pos, nm->second});
  }
  const size_t start = out.size();
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() > 200000) cache.clear();  // bound memory on adversarial input
    cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + static_cast<long>(start), out.end()));
  }
}

// One added-token-free segment: invalid UTF-8 bytes become byte tokens, valid runs go through the pipeline.
void TokenizerImpl::encode_bpe_segment(std::string_view text, std::vector<int32_t>& out) const {
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    while (j < text.size()) {
      const size_t l = utf8_valid_len(text, j);
      if (l == 0) break;
      j += l;
    }
    if (j > i) {
      std::vector<std::string> words{nfc ? nfc_normalize(text.substr(i, j - i)) : std::string(text.substr(i, j - i))};
      for (const PreStep& step : pre) {
        std::vector<std::string> next;
        next.reserve(words.size() * 2);
        for (std::string& w : words) {
          if (step.kind == PreStep::kByteLevel && step.add_prefix_space && !w.empty() && w[0] != ' ') w.insert(0, 1, ' ');
          if (step.regex) {
            MatchData md(*step.regex);
            size_t last = 0;
            step.regex->for_each_match(w, md.md, [&](size_t b, size_t e) {
              if (b > last) next.push_back(w.substr(last, b - last));  // Isolated: gaps are pieces too
              next.push_back(w.substr(b, e - b));
              last = e;
            });
            if (last < w.size()) next.push_back(w.substr(last));
          } else if (step.kind == PreStep::kDigits) {
            // HF Digits: runs of numeric chars (Rust char::is_numeric = \p{N}) split off; one each if individual.
            size_t k = 0, run = 0;
            int run_kind = -1;
            while (k < w.size()) {
              const size_t l = std::max<size_t>(1, utf8_valid_len(w, k));
              const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(utf8_decode(w, k, l)));
              const int kind = (cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO) ? 1 : 0;
              if (k > run && (kind != run_kind || (kind == 1 && step.individual_digits))) {
                next.push_back(w.substr(run, k - run));
                run = k;
              }
              run_kind = kind;
              k += l;
            }
            if (run < w.size()) next.push_back(w.substr(run));
          } else {
            next.push_back(std::move(w));
          }
        }
        words.swap(next);
      }
      for (const std::string& w : words) bpe_word(w, out);
    }
    if (j < text.size()) {
      if (byte_token[static_cast<unsigned char>(text[j])] >= 0) out.push_back(byte_token[static_cast<unsigned char>(text[j])]);
      ++j;
    }
    i = j;
  }
}

// llama.cpp's SPM session: characters as symbols, repeatedly merge the adjacent pair whose joined text is
// the highest-scoring vocab entry (leftmost on ties), then re-split pieces that are not tokens via the
// recorded merges, falling back to <0xXX> byte tokens.
void TokenizerImpl::encode_spm_segment(std::string_view text, std::vector<int32_t>& out) const {
  struct Sym { int32_t prev, next; size_t start, n; };
  std::vector<Sym> syms;
  for (size_t i = 0; i < text.size();) {
    // llama.cpp takes the length from the lead byte alone, so an invalid sequence could swallow the next
    // character; here each invalid byte is its own symbol, which no vocab piece matches -> its byte token.
    const size_t l = std::max<size_t>(1, utf8_valid_len(text, i));
    syms.push_back({static_cast<int32_t>(syms.size()) - 1, static_cast<int32_t>(syms.size()) + 1, i, l});
    i += l;
  }
  if (syms.empty()) return;
  syms.back().next = -1;
  struct Bigram { int32_t left, right; float score; size_t size; };
  auto cmp = [](const Bigram& l, const Bigram& r) { return l.score < r.score || (l.score == r.score && l.left > r.left); };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(cmp)> queue(cmp);
  std::unordered_map<std::string, std::pair<int32_t, int32_t>> rev_merge;
  auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const std::string s(text.substr(syms[left].start, syms[left].n + syms[right].n));
    auto it = vocab.find(s);
    if (it == vocab.end()) return;
    queue.push({left, right, scores[it->second], s.size()});
    rev_merge[s] = {left, right};
  };
  for (size_t i = 1; i < syms.size(); ++i) try_add(static_cast<int32_t>(i) - 1, static_cast<int32_t>(i));
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Sym& l = syms[b.left];
    Sym& r = syms[b.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  std::function<void(const Sym&)> resegment = [&](const Sym& s) {
    const std::string t(text.substr(s.start, s.n));
    if (auto it = vocab.find(t); it != vocab.end()) { out.push_back(it->second); return; }
    auto p = rev_merge.find(t);
    if (p == rev_merge.end()) {
      for (unsigned char c : t) out.push_back(byte_token[c]);
      return;
    }
    resegment(syms[p->second.first]);
    resegment(syms[p->second.second]);
  };
  for (int32_t i = 0; i >= 0; i = syms[i].next) resegment(syms[i]);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  RLAIF_CHECK(impl_, "Tokenizer::encode on a tokenizer that was never loaded (use from_dir / from_gguf)");
  const TokenizerImpl& t = *impl_;
  std::vector<Piece> parts;
  t.split_added(text, parse_special, parts);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  bool prev_special = true;  // llama.cpp: a space is prefixed to text at the start or after a token
  for (const Piece& p : parts) {
    if (p.token >= 0) {
      out.push_back(p.token);
      prev_special = true;
      continue;
    }
    if (!t.spm) {
      t.encode_bpe_segment(p.text, out);
      continue;
    }
    std::string s = t.add_space_prefix && prev_special ? " " : "";
    s += p.text;
    std::string esc;
    for (char c : s) c == ' ' ? esc += "\xE2\x96\x81" : esc += c;
    t.encode_spm_segment(esc, out);
    prev_special = false;
  }
  return out;
}

namespace {
// The bytes one token contributes to decoded text; `first` applies SPM's removal of the prefixed space.
std::string_view token_bytes(const TokenizerImpl& t, int32_t id, bool skip_special, bool* first) {
  if (id < 0 || static_cast<size_t>(id) >= t.bytes.size()) return {};
  if (skip_special && t.special[id]) return {};
  std::string_view b = t.bytes[id];
  if (t.spm && *first) {
    *first = false;
    if (t.add_space_prefix && !b.empty() && b[0] == ' ') b.remove_prefix(1);
  }
  return b;
}
}  // namespace

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  RLAIF_CHECK(impl_, "Tokenizer::decode on a tokenizer that was never loaded (use from_dir / from_gguf)");
  std::string out;
  bool first = true;
  for (int32_t id : ids) out += token_bytes(*impl_, id, skip_special, &first);
  return out;
}

std::string Tokenizer::StreamDecoder::push(int32_t id) {
  pending_ += token_bytes(*tok_->impl_, id, skip_special_, &first_);
  // Emit up to the last complete character; hold an incomplete tail (at most 3 bytes) unless it can never
  // complete (then it is emitted as is, as decode() would).
  size_t cut = pending_.size();
  for (size_t back = 1; back <= std::min<size_t>(3, pending_.size()); ++back) {
    const auto c = static_cast<unsigned char>(pending_[pending_.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t need = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    if (need > back) cut = pending_.size() - back;
    break;
  }
  std::string ready = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return ready;
}

std::string Tokenizer::StreamDecoder::flush() {
  std::string r;
  r.swap(pending_);
  return r;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->pieces.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->vocab.find(std::string(token));
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return impl_->pieces[id];
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && impl_->special[id]; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->pad; }
bool Tokenizer::add_bos() const { return impl_->add_bos; }
bool Tokenizer::is_spm() const { return impl_->spm; }

// ---- loading ------------------------------------------------------------------------------------------

namespace {

json load_json(const std::filesystem::path& p) {
  try {
    return json::parse(read_file(p));
  } catch (const json::exception& e) {
    fail(fmt::format("{}: invalid JSON: {}", p.string(), e.what()));
  }
}

void add_merge(TokenizerImpl& t, const std::string& a, const std::string& b, int32_t rank, const std::string& where) {
  const int32_t ia = must_id(t, a, where), ib = must_id(t, b, where), im = must_id(t, a + b, where);
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia)) << 32) | static_cast<uint32_t>(ib);
  t.merges.emplace(key, std::make_pair(rank, im));  // first occurrence wins, as in HF
}

void set_vocab_size(TokenizerImpl& t, size_t n) {
  if (t.pieces.size() < n) t.pieces.resize(n);
}

void add_token(TokenizerImpl& t, const std::string& content, int32_t id, bool special, bool lstrip, bool rstrip) {
  if (id < 0) fail(fmt::format("added token '{}' has negative id {}", content, id));
  set_vocab_size(t, static_cast<size_t>(id) + 1);
  t.pieces[id] = content;
  t.vocab[content] = id;
  for (auto& a : t.added)
    if (a.id == id) { a = {content, id, special, lstrip, rstrip}; return; }
  t.added.push_back({content, id, special, lstrip, rstrip});
}

void init_byte_tokens_bpe(TokenizerImpl& t, const std::string& where) {
  for (int b = 0; b < 256; ++b) {
    std::string s;
    append_utf8(s, byte_to_unicode()[b]);
    auto it = t.vocab.find(s);
    t.byte_token[b] = it == t.vocab.end() ? -1 : it->second;  // HF BPE without unk_token drops such bytes
  }
}

PreStep byte_level_step(bool use_regex, bool add_prefix_space) {
  PreStep s{PreStep::kByteLevel, nullptr, false, add_prefix_space};
  if (use_regex) s.regex = std::make_shared<Regex>(kGpt2Regex);
  return s;
}

void parse_pre(TokenizerImpl& t, const json& j, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : j.at("pretokenizers")) parse_pre(t, s, where);
  } else if (type == "Split") {
    const json& pat = j.at("pattern");
    if (!pat.contains("Regex")) fail(fmt::format("{}: Split with a String pattern is not supported", where));
    if (j.value("behavior", "") != "Isolated" || j.value("invert", false))
      fail(fmt::format("{}: Split behavior '{}' (invert {}) is not supported", where, j.value("behavior", ""), j.value("invert", false)));
    t.pre.push_back({PreStep::kSplit, std::make_shared<Regex>(pat["Regex"].get<std::string>()), false, false});
  } else if (type == "ByteLevel") {
    t.pre.push_back(byte_level_step(j.value("use_regex", true), j.value("add_prefix_space", false)));
  } else if (type == "Digits") {
    t.pre.push_back({PreStep::kDigits, nullptr, j.value("individual_digits", false), false});
  } else {
    fail(fmt::format("{}: pre_tokenizer '{}' is not supported", where, type), "supported: Sequence, Split, ByteLevel, Digits");
  }
}

void parse_normalizer(TokenizerImpl& t, const json& j, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "NFC") t.nfc = true;
  else if (type == "Sequence") for (const auto& s : j.at("normalizers")) parse_normalizer(t, s, where);
  else fail(fmt::format("{}: normalizer '{}' is not supported", where, type), "supported: NFC");
}

// bos/eos/pad from tokenizer_config.json (a string or an {"content": ...} object; null means none).
std::optional<int32_t> config_token(const TokenizerImpl& t, const json& cfg, const char* key) {
  if (!cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
  const json& v = cfg[key];
  const std::string s = v.is_string() ? v.get<std::string>() : v.value("content", "");
  auto it = t.vocab.find(s);
  if (it == t.vocab.end()) return std::nullopt;
  return it->second;
}

}  // namespace

Tokenizer Tokenizer::from_dir(const std::filesystem::path& dir) {
  auto t = std::make_shared<TokenizerImpl>();
  const auto tj = dir / "tokenizer.json";
  json cfg = std::filesystem::exists(dir / "tokenizer_config.json") ? load_json(dir / "tokenizer_config.json") : json::object();
  try {
    if (std::filesystem::exists(tj)) {
      const json j = load_json(tj);
      const std::string where = tj.string();
      const json& m = j.at("model");
      if (m.value("type", "BPE") != "BPE") fail(fmt::format("{}: model type '{}' is not supported", where, m.value("type", "")), "only byte-level BPE tokenizer.json files are supported");
      t->vocab.reserve(m.at("vocab").size() * 2);
      t->merges.reserve(m.contains("merges") ? m["merges"].size() * 2 : 0);
      for (const auto& [tok, id] : m.at("vocab").items()) {
        set_vocab_size(*t, id.get<size_t>() + 1);
        t->pieces[id.get<size_t>()] = tok;
        t->vocab[tok] = id.get<int32_t>();
      }
      t->ignore_merges = m.value("ignore_merges", false);
      int32_t rank = 0;
      for (const auto& mg : m.at("merges")) {
        if (mg.is_string()) {
          const std::string s = mg.get<std::string>();
          const size_t sp = s.find(' ', 1);
          if (sp == std::string::npos) fail(fmt::format("{}: merge '{}' has no space", where, s));
          add_merge(*t, s.substr(0, sp), s.substr(sp + 1), rank++, where);
        } else {
          add_merge(*t, mg.at(0).get<std::string>(), mg.at(1).get<std::string>(), rank++, where);
        }
      }
      parse_normalizer(*t, j.value("normalizer", json()), where);
      parse_pre(*t, j.value("pre_tokenizer", json()), where);
      if (j.contains("decoder") && !j["decoder"].is_null() && j["decoder"].value("type", "") != "ByteLevel")
        fail(fmt::format("{}: decoder '{}' is not supported", where, j["decoder"].value("type", "")), "only ByteLevel");
      for (const auto& a : j.value("added_tokens", json::array()))
        add_token(*t, a.at("content"), a.at("id"), a.value("special", false), a.value("lstrip", false), a.value("rstrip", false));
      init_byte_tokens_bpe(*t, where);
    } else {
      const auto vj = dir / "vocab.json", mt = dir / "merges.txt";
      if (!std::filesystem::exists(vj) || !std::filesystem::exists(mt))
        fail(fmt::format("{} has neither tokenizer.json nor vocab.json + merges.txt", dir.string()));
      const json vocab = load_json(vj);
      t->vocab.reserve(vocab.size() * 2);
      t->merges.reserve(vocab.size() * 2);
      for (const auto& [tok, id] : vocab.items()) {
        set_vocab_size(*t, id.get<size_t>() + 1);
        t->pieces[id.get<size_t>()] = tok;
        t->vocab[tok] = id.get<int32_t>();
      }
      std::ifstream in(mt, std::ios::binary);
      std::string line;
      int32_t rank = 0;
      size_t lineno = 0;
      while (std::getline(in, line)) {
        ++lineno;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || (lineno == 1 && line.rfind("#version", 0) == 0)) continue;
        const size_t sp = line.find(' ', 1);
        if (sp == std::string::npos) fail(fmt::format("{}:{}: merge line has no space", mt.string(), lineno));
        add_merge(*t, line.substr(0, sp), line.substr(sp + 1), rank++, fmt::format("{}:{}", mt.string(), lineno));
      }
      // transformers' slow->fast conversion: Qwen2Tokenizer gets NFC + the Qwen split; others GPT-2's ByteLevel.
      if (cfg.value("tokenizer_class", "").rfind("Qwen2", 0) == 0) {
        t->nfc = true;
        t->pre.push_back({PreStep::kSplit, std::make_shared<Regex>(kQwenRegex), false, false});
        t->pre.push_back(byte_level_step(false, false));
      } else {
        t->pre.push_back(byte_level_step(true, cfg.value("add_prefix_space", false)));
      }
      if (std::filesystem::exists(dir / "added_tokens.json")) {
        const json added = load_json(dir / "added_tokens.json");
        for (const auto& [tok, id] : added.items()) add_token(*t, tok, id, true, false, false);
      }
      init_byte_tokens_bpe(*t, vj.string());
    }
    // tokenizer_config's added_tokens_decoder has the authoritative flags.
    if (cfg.contains("added_tokens_decoder"))
      for (const auto& [id, a] : cfg["added_tokens_decoder"].items())
        add_token(*t, a.at("content"), std::stoi(id), a.value("special", false), a.value("lstrip", false), a.value("rstrip", false));
  } catch (const json::exception& e) {
    fail(fmt::format("{}: unexpected tokenizer file structure: {}", dir.string(), e.what()));
  }
  t->bos = config_token(*t, cfg, "bos_token");
  t->eos = config_token(*t, cfg, "eos_token");
  t->pad = config_token(*t, cfg, "pad_token");
  t->add_bos = cfg.value("add_bos_token", false) && t->bos.has_value();
  t->finish();
  Tokenizer tok;
  tok.impl_ = std::move(t);
  return tok;
}

Tokenizer Tokenizer::from_gguf(const GgufFile& g) {
  auto t = std::make_shared<TokenizerImpl>();
  const std::string model = g.get_string("tokenizer.ggml.model");
  t->pieces = g.get_string_array("tokenizer.ggml.tokens");
  const size_t n = t->pieces.size();
  std::vector<int32_t> types = g.has("tokenizer.ggml.token_type") ? g.get_i32_array("tokenizer.ggml.token_type")
                                                                   : std::vector<int32_t>(n, 1);
  if (types.size() != n) fail(fmt::format("{}: {} token types for {} tokens", g.path().string(), types.size(), n));
  for (size_t i = 0; i < n; ++i) t->vocab.emplace(t->pieces[i], static_cast<int32_t>(i));
  // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control and
  // unknown tokens are special (parsed only with parse_special); user-defined ones are always matched.
  for (size_t i = 0; i < n; ++i)
    if (types[i] == 2 || types[i] == 3 || types[i] == 4)
      t->added.push_back({t->pieces[i], static_cast<int32_t>(i), types[i] != 4, false, false});
  const std::string where = g.path().string();
  if (model == "gpt2") {
    const auto& merges = g.get_string_array("tokenizer.ggml.merges");
    for (size_t r = 0; r < merges.size(); ++r) {
      const size_t sp = merges[r].find(' ', 1);
      if (sp == std::string::npos) fail(fmt::format("{}: merge {} '{}' has no space", where, r, merges[r]));
      add_merge(*t, merges[r].substr(0, sp), merges[r].substr(sp + 1), static_cast<int32_t>(r), where);
    }
    const std::string pre = g.has("tokenizer.ggml.pre") ? g.get_string("tokenizer.ggml.pre") : "gpt2";
    if (pre == "qwen2") {
      t->nfc = true;  // HF's Qwen2 normalizer (llama.cpp itself skips NFC; HF is the reference here)
      t->pre.push_back({PreStep::kSplit, std::make_shared<Regex>(kQwenRegex), false, false});
      t->pre.push_back(byte_level_step(false, false));
    } else if (pre == "smollm") {  // llama.cpp: "\p{N}" then the GPT-2 regex = HF Digits(individual) + ByteLevel
      t->pre.push_back({PreStep::kDigits, nullptr, true, false});
      t->pre.push_back(byte_level_step(true, false));
    } else if (pre == "gpt2" || pre == "default") {
      t->pre.push_back(byte_level_step(true, false));
    } else {
      fail(fmt::format("{}: tokenizer.ggml.pre '{}' is not supported", where, pre), "supported: gpt2, smollm, qwen2");
    }
    init_byte_tokens_bpe(*t, where);
    t->add_bos = g.has("tokenizer.ggml.add_bos_token") ? g.get_bool("tokenizer.ggml.add_bos_token") : false;
  } else if (model == "llama") {
    t->spm = true;
    t->scores = g.get_f32_array("tokenizer.ggml.scores");
    if (t->scores.size() != n) fail(fmt::format("{}: {} scores for {} tokens", where, t->scores.size(), n));
    t->byte_token.fill(-1);
    for (size_t i = 0; i < n; ++i) {
      const std::string& p = t->pieces[i];
      if (types[i] == 6 && p.size() == 6 && p.rfind("<0x", 0) == 0)
        t->byte_token[std::stoi(p.substr(3, 2), nullptr, 16)] = static_cast<int32_t>(i);
    }
    for (int b = 0; b < 256; ++b)
      if (t->byte_token[b] < 0) fail(fmt::format("{}: no byte token <0x{:02X}> (byte fallback needs all 256)", where, b));
    t->add_space_prefix = g.has("tokenizer.ggml.add_space_prefix") ? g.get_bool("tokenizer.ggml.add_space_prefix") : true;
    t->add_bos = g.has("tokenizer.ggml.add_bos_token") ? g.get_bool("tokenizer.ggml.add_bos_token") : true;
  } else {
    fail(fmt::format("{}: tokenizer.ggml.model '{}' is not supported", where, model), "supported: gpt2, llama");
  }
  auto opt_id = [&](const char* key) -> std::optional<int32_t> {
    if (!g.has(key)) return std::nullopt;
    const uint64_t v = g.get_u64(key);
    if (v >= n) return std::nullopt;  // 0xFFFFFFFF means "none"
    return static_cast<int32_t>(v);
  };
  t->bos = opt_id("tokenizer.ggml.bos_token_id");
  t->eos = opt_id("tokenizer.ggml.eos_token_id");
  t->pad = opt_id("tokenizer.ggml.padding_token_id");
  t->finish();
  Tokenizer tok;
  tok.impl_ = std::move(t);
  return tok;
}

}  // namespace rlaif
