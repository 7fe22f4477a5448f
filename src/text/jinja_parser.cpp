// Lexer and parser of the chat-template Jinja subset. Whitespace control follows jinja2's lexer with HF's
// settings (trim_blocks, lstrip_blocks, `-`/`+` modifiers, one trailing newline dropped); operator
// precedence follows jinja2's parser (filters bind tighter than arithmetic: `xs|length - 1`).
#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "text/jinja.h"

namespace rlaif::jinja {

namespace {

struct Token {
  enum class Type { kName, kString, kInt, kFloat, kOp, kEnd };
  Type type = Type::kEnd;
  std::string text;  // name, operator, or decoded string
  Value value;       // numbers
  int line = 0;
};

// One piece of the template: literal text, a {{ }} expression or a {% %} statement.
struct Segment {
  enum class Type { kText, kVar, kBlock };
  Type type;
  std::string text;
  std::vector<Token> tokens;
  int line;
};

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

class Lexer {
 public:
  Lexer(std::string source, std::string name) : src_(std::move(source)), name_(std::move(name)) {
    // jinja2 normalizes newlines in the source and drops one trailing newline (keep_trailing_newline=False).
    std::string norm;
    norm.reserve(src_.size());
    for (size_t k = 0; k < src_.size(); ++k) {
      if (src_[k] == '\r') {
        norm += '\n';
        if (k + 1 < src_.size() && src_[k + 1] == '\n') ++k;
      } else {
        norm += src_[k];
      }
    }
    if (!norm.empty() && norm.back() == '\n') norm.pop_back();
    src_ = std::move(norm);
  }

  std::vector<Segment> run() {
    std::vector<Segment> out;
    size_t pos = 0;
    bool strip_next = false, trim_next = false;
    while (pos <= src_.size()) {
      size_t open = src_.find('{', pos);
      while (open != std::string::npos && open + 1 < src_.size() && !std::strchr("{%#", src_[open + 1]))
        open = src_.find('{', open + 1);
      if (open != std::string::npos && open + 1 >= src_.size()) open = std::string::npos;
      size_t data_start = pos, data_end = open == std::string::npos ? src_.size() : open;
      if (strip_next) {
        while (data_start < data_end && is_ws(src_[data_start])) ++data_start;
      } else if (trim_next && data_start < data_end && src_[data_start] == '\n') {
        ++data_start;
      }
      std::string text = src_.substr(data_start, data_end - data_start);
      const int text_line = line_at(data_start);
      if (open == std::string::npos) {
        if (!text.empty()) out.push_back({Segment::Type::kText, text, {}, text_line});
        break;
      }
      const char kind = src_[open + 1];
      const char mod = open + 2 < src_.size() ? src_[open + 2] : '\0';
      if (mod == '-') {
        while (!text.empty() && is_ws(text.back())) text.pop_back();
      } else if (mod != '+' && kind != '{') {
        // lstrip_blocks: drop spaces/tabs between the line start and a block or comment tag.
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        const bool line_starting = data_start == 0 || src_[data_start - 1] == '\n';
        if ((l_pos > 0 || line_starting) &&
            text.find_first_not_of(" \t", l_pos) == std::string::npos)
          text.resize(l_pos);
      }
      if (!text.empty()) out.push_back({Segment::Type::kText, text, {}, text_line});
      size_t p = open + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
      const int tag_line = line_at(open);
      char end_mod = '\0';
      if (kind == '#') {
        const size_t close = src_.find("#}", p);
        if (close == std::string::npos) fail(tag_line, "unclosed comment");
        if (close > p && (src_[close - 1] == '-' || src_[close - 1] == '+')) end_mod = src_[close - 1];
        pos = close + 2;
      } else {
        Segment seg{kind == '{' ? Segment::Type::kVar : Segment::Type::kBlock, "", {}, tag_line};
        pos = tokenize(p, kind == '{' ? '}' : '%', seg.tokens, end_mod);
        if (seg.tokens.empty()) fail(tag_line, kind == '{' ? "empty expression" : "empty tag");
        out.push_back(std::move(seg));
      }
      strip_next = end_mod == '-';
      trim_next = kind != '{' && end_mod != '+';  // trim_blocks: not after {{ }}, not with `+%}`
    }
    return out;
  }

 private:
  int line_at(size_t pos) {
    while (line_pos_ < pos && line_pos_ < src_.size()) {
      if (src_[line_pos_] == '\n') ++line_;
      ++line_pos_;
    }
    return line_;
  }

  [[noreturn]] void fail(int line, const std::string& msg) {
    throw Error("chat_template", fmt::format("{}:{}: {}", name_, line, msg));
  }

  // Reads tokens from `p` until the closing `}}`/`%}` at bracket depth 0; returns the position after it.
  size_t tokenize(size_t p, char closer, std::vector<Token>& toks, char& end_mod) {
    int depth = 0;
    const std::string close = std::string(1, closer) + "}";
    while (true) {
      while (p < src_.size() && is_ws(src_[p])) ++p;
      if (p >= src_.size()) fail(line_at(p), fmt::format("unclosed tag, expected '{}'", close));
      const int line = line_at(p);
      if (depth == 0) {
        if (src_.compare(p, 2, close) == 0) { end_mod = '\0'; return p + 2; }
        if ((src_[p] == '-' || (src_[p] == '+' && closer == '%')) && src_.compare(p + 1, 2, close) == 0) {
          end_mod = src_[p];
          return p + 3;
        }
      }
      const char c = src_[p];
      Token t;
      t.line = line;
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        t.type = Token::Type::kName;
        t.text = src_.substr(p, q - p);
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        p = number(p, t);
      } else if (c == '\'' || c == '"') {
        p = string_literal(p, t);
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">",
                                     "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
        const char* match = nullptr;
        for (const char* op : kOps)
          if (src_.compare(p, std::strlen(op), op) == 0) { match = op; break; }
        if (!match) fail(line, fmt::format("unexpected character '{}'", c));
        t.type = Token::Type::kOp;
        t.text = match;
        p += t.text.size();
        if (t.text == "(" || t.text == "[" || t.text == "{") ++depth;
        if (t.text == ")" || t.text == "]" || t.text == "}") depth = std::max(0, depth - 1);
      }
      toks.push_back(std::move(t));
    }
  }

  size_t number(size_t p, Token& t) {
    size_t q = p;
    auto digits = [&] { while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q; };
    digits();
    bool is_float = false;
    if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
      is_float = true;
      ++q;
      digits();
    }
    if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
      size_t r = q + 1;
      if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
      if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
        is_float = true;
        q = r;
        digits();
      }
    }
    std::string text = src_.substr(p, q - p);
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    t.type = is_float ? Token::Type::kFloat : Token::Type::kInt;
    t.value = is_float ? Value::real(std::stod(text)) : Value::integer(std::stoll(text));
    return q;
  }

  // Python string literal with unicode-escape decoding, as jinja2 does.
  size_t string_literal(size_t p, Token& t) {
    const char quote = src_[p];
    const int line = line_at(p);
    std::string out;
    size_t q = p + 1;
    auto hexval = [&](size_t at, int n) {
      if (at + static_cast<size_t>(n) > src_.size()) fail(line, "truncated escape in string literal");
      return static_cast<char32_t>(std::stoul(src_.substr(at, static_cast<size_t>(n)), nullptr, 16));
    };
    while (true) {
      if (q >= src_.size()) fail(line, "unterminated string literal");
      const char c = src_[q];
      if (c == quote) break;
      if (c != '\\') { out += c; ++q; continue; }
      if (q + 1 >= src_.size()) fail(line, "unterminated string literal");
      const char e = src_[q + 1];
      q += 2;
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '0': out += '\0'; break;
        case '\n': break;  // line continuation
        case 'x': out += encode_utf8(std::u32string(1, hexval(q, 2))); q += 2; break;
        case 'u': out += encode_utf8(std::u32string(1, hexval(q, 4))); q += 4; break;
        case 'U': out += encode_utf8(std::u32string(1, hexval(q, 8))); q += 8; break;
        default: out += '\\'; out += e;  // Python keeps unknown escapes verbatim
      }
    }
    t.type = Token::Type::kString;
    t.text = std::move(out);
    return q + 1;
  }

  std::string src_, name_;
  size_t line_pos_ = 0;
  int line_ = 1;
};

class Parser {
 public:
  Parser(std::vector<Segment> segs, std::string name) : segs_(std::move(segs)), name_(std::move(name)) {}

  Body parse_all() {
    std::string end;
    Body body = parse_body({}, end);
    return body;
  }

 private:
  // ---- token cursor within the current tag ----
  const Token& cur() const {
    static const Token kEnd;
    return tpos_ < toks_->size() ? (*toks_)[tpos_] : kEnd;
  }
  int cur_line() const { return tpos_ < toks_->size() ? (*toks_)[tpos_].line : tag_line_; }
  bool at_end() const { return tpos_ >= toks_->size(); }
  bool is_op(const char* op) const { return cur().type == Token::Type::kOp && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Token::Type::kName && cur().text == n; }
  Token next() { return (*toks_)[tpos_++]; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(cur_line(), fmt::format("expected '{}', got {}", op, describe()));
    ++tpos_;
  }
  std::string expect_name() {
    if (cur().type != Token::Type::kName) fail(cur_line(), fmt::format("expected a name, got {}", describe()));
    return next().text;
  }
  void expect_end() {
    if (!at_end()) fail(cur_line(), fmt::format("unexpected {} at end of tag", describe()));
  }
  std::string describe() const {
    if (at_end()) return "end of tag";
    return cur().type == Token::Type::kString ? "string literal" : "'" + cur().text + "'";
  }
  [[noreturn]] void fail(int line, const std::string& msg) const {
    throw Error("chat_template", fmt::format("{}:{}: {}", name_, line, msg));
  }

  ExprPtr make(Expr::Kind k, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  // ---- statements ----
  // Parses nodes until a block tag named in `stops`; leaves its tokens current and returns its name in `end`.
  Body parse_body(const std::vector<std::string>& stops, std::string& end) {
    Body body;
    while (seg_ < segs_.size()) {
      const Segment& s = segs_[seg_++];
      if (s.type == Segment::Type::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kText;
        n->line = s.line;
        n->text = s.text;
        body.push_back(std::move(n));
        continue;
      }
      toks_ = &s.tokens;
      tpos_ = 0;
      tag_line_ = s.line;
      if (s.type == Segment::Type::kVar) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kOutput;
        n->line = s.line;
        n->expr = parse_tuple(true);
        expect_end();
        body.push_back(std::move(n));
        continue;
      }
      if (cur().type != Token::Type::kName) fail(s.line, fmt::format("expected a tag name, got {}", describe()));
      const std::string tag = cur().text;
      if (std::find(stops.begin(), stops.end(), tag) != stops.end()) {
        ++tpos_;
        end = tag;
        return body;
      }
      body.push_back(parse_statement(s.line));
    }
    if (!stops.empty()) fail(segs_.empty() ? 1 : segs_.back().line, fmt::format("missing '{{% {} %}}' at end of template", stops.back()));
    return body;
  }

  NodePtr parse_statement(int line) {
    const std::string tag = next().text;
    auto n = std::make_unique<Node>();
    n->line = line;
    std::string end;
    if (tag == "if") {
      n->kind = Node::Kind::kIf;
      ExprPtr cond = parse_tuple(false);
      while (true) {
        expect_end();
        Body b = parse_body({"elif", "else", "endif"}, end);
        n->branches.emplace_back(std::move(cond), std::move(b));
        if (end == "elif") { cond = parse_tuple(false); continue; }
        if (end == "else") {
          expect_end();
          n->else_body = parse_body({"endif"}, end);
        }
        expect_end();
        break;
      }
    } else if (tag == "for") {
      n->kind = Node::Kind::kFor;
      n->targets = parse_targets(false);
      if (!is_name("in")) fail(cur_line(), fmt::format("expected 'in' in for loop, got {}", describe()));
      ++tpos_;
      n->expr = parse_tuple(false);
      if (is_name("recursive")) fail(cur_line(), "unsupported: recursive for loops");
      if (is_name("if")) { ++tpos_; n->filter = parse_expression(true); }
      expect_end();
      n->body = parse_body({"else", "endfor"}, end);
      if (end == "else") {
        expect_end();
        n->else_body = parse_body({"endfor"}, end);
      }
      expect_end();
    } else if (tag == "set") {
      n->targets = parse_targets(true);
      if (is_op("=")) {
        ++tpos_;
        n->kind = Node::Kind::kSet;
        n->expr = parse_tuple(true);
        expect_end();
      } else {
        if (n->targets.size() != 1) fail(line, "block set takes exactly one target");
        n->kind = Node::Kind::kSetBlock;
        expect_end();
        n->body = parse_body({"endset"}, end);
        expect_end();
      }
    } else if (tag == "macro") {
      n->kind = Node::Kind::kMacro;
      n->text = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        std::string param = expect_name();
        ExprPtr def;
        if (is_op("=")) { ++tpos_; def = parse_expression(true); }
        n->params.emplace_back(std::move(param), std::move(def));
        if (!is_op(",")) break;
        ++tpos_;
      }
      expect_op(")");
      expect_end();
      n->body = parse_body({"endmacro"}, end);
      expect_end();
    } else if (tag == "break" || tag == "continue") {
      n->kind = tag == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      expect_end();
    } else if (tag == "generation") {
      // transformers' AssistantTracker tag: renders its body unchanged.
      n->kind = Node::Kind::kPassThrough;
      expect_end();
      n->body = parse_body({"endgeneration"}, end);
      expect_end();
    } else {
      fail(line, fmt::format("unknown or unsupported tag '{}'", tag));
    }
    return n;
  }

  // for/set targets: `a`, `a, b`, `(a, b)`, and for set also `ns.attr`.
  std::vector<std::string> parse_targets(bool allow_attr) {
    std::vector<std::string> out;
    const bool paren = is_op("(");
    if (paren) ++tpos_;
    while (true) {
      std::string t = expect_name();
      if (allow_attr && is_op(".")) {
        ++tpos_;
        t += "." + expect_name();
      }
      out.push_back(t);
      if (!is_op(",")) break;
      ++tpos_;
    }
    if (paren) expect_op(")");
    return out;
  }

  // ---- expressions (jinja2's precedence) ----
  bool at_expr_end() const {
    return at_end() || is_op(")") || is_op("]") || is_op("}") || is_op("=") || is_name("in") || is_name("if") ||
           is_name("else") || is_name("recursive");
  }

  ExprPtr parse_tuple(bool with_condexpr) {
    const int line = cur_line();
    ExprPtr first = parse_expression(with_condexpr);
    if (!is_op(",")) return first;
    auto t = make(Expr::Kind::kTuple, line);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      ++tpos_;
      if (at_expr_end()) break;
      t->args.push_back(parse_expression(with_condexpr));
    }
    return t;
  }

  ExprPtr parse_expression(bool with_condexpr) { return with_condexpr ? parse_condexpr() : parse_or(); }

  ExprPtr parse_condexpr() {
    ExprPtr e = parse_or();
    while (is_name("if")) {
      const int line = cur_line();
      ++tpos_;
      auto c = make(Expr::Kind::kCond, line);
      ExprPtr cond = parse_or();
      ExprPtr other;
      if (is_name("else")) { ++tpos_; other = parse_condexpr(); }
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(other));  // may be null: undefined
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(Expr::Kind k, const std::string& op, ExprPtr a, ExprPtr b, int line) {
    auto e = make(k, line);
    e->name = op;
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  // One left-associative precedence level: operands from `sub`, operators (names or symbols) from `ops`.
  ExprPtr left_assoc(Expr::Kind kind, std::initializer_list<const char*> ops, ExprPtr (Parser::*sub)()) {
    ExprPtr e = (this->*sub)();
    while (!at_end() && cur().type != Token::Type::kString) {
      const auto op = std::find_if(ops.begin(), ops.end(), [&](const char* o) { return cur().text == o; });
      if (op == ops.end()) break;
      const int l = cur_line();
      ++tpos_;
      e = binary(kind, *op, std::move(e), (this->*sub)(), l);
    }
    return e;
  }
  ExprPtr parse_or() { return left_assoc(Expr::Kind::kOr, {"or"}, &Parser::parse_and); }
  ExprPtr parse_and() { return left_assoc(Expr::Kind::kAnd, {"and"}, &Parser::parse_not); }
  ExprPtr parse_not() {
    if (is_name("not")) {
      auto e = make(Expr::Kind::kNot, cur_line());
      ++tpos_;
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const int line = cur_line();
    ExprPtr left = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().type == Token::Type::kOp &&
          (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">="))) {
        op = next().text;
      } else if (is_name("in")) {
        ++tpos_;
        op = "in";
      } else if (is_name("not") && tpos_ + 1 < toks_->size() && (*toks_)[tpos_ + 1].type == Token::Type::kName &&
                 (*toks_)[tpos_ + 1].text == "in") {
        tpos_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Kind::kCompare, line);
        cmp->args.push_back(std::move(left));
      }
      cmp->kwargs.emplace_back(op, parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(left);
  }
  ExprPtr parse_math1() { return left_assoc(Expr::Kind::kBinary, {"+", "-"}, &Parser::parse_concat); }
  ExprPtr parse_concat() { return left_assoc(Expr::Kind::kBinary, {"~"}, &Parser::parse_math2); }
  ExprPtr parse_math2() { return left_assoc(Expr::Kind::kBinary, {"*", "/", "//", "%"}, &Parser::parse_pow); }
  ExprPtr parse_pow() { return left_assoc(Expr::Kind::kBinary, {"**"}, &Parser::parse_filtered_unary); }
  ExprPtr parse_filtered_unary() { return parse_unary(true); }
  ExprPtr parse_unary(bool with_filter) {
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      e = make(is_op("-") ? Expr::Kind::kNeg : Expr::Kind::kPos, cur_line());
      ++tpos_;
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    const int line = cur_line();
    if (at_end()) fail(line, "unexpected end of expression");
    switch (t.type) {
      case Token::Type::kName: {
        ++tpos_;
        auto e = make(Expr::Kind::kLiteral, line);
        if (t.text == "true" || t.text == "True") e->literal = Value::boolean(true);
        else if (t.text == "false" || t.text == "False") e->literal = Value::boolean(false);
        else if (t.text == "none" || t.text == "None") e->literal = Value::none();
        else { e->kind = Expr::Kind::kName; e->name = t.text; }
        return e;
      }
      case Token::Type::kString: {
        std::string s;
        while (cur().type == Token::Type::kString && !at_end()) s += next().text;  // "a" "b" concatenates
        auto e = make(Expr::Kind::kLiteral, line);
        e->literal = Value::string(std::move(s));
        return e;
      }
      case Token::Type::kInt:
      case Token::Type::kFloat: {
        auto e = make(Expr::Kind::kLiteral, line);
        e->literal = next().value;
        return e;
      }
      default: break;
    }
    if (is_op("(")) {
      ++tpos_;
      if (is_op(")")) { ++tpos_; return make(Expr::Kind::kTuple, line); }
      ExprPtr e = parse_tuple(true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      ++tpos_;
      auto e = make(Expr::Kind::kList, line);
      while (!is_op("]")) {
        e->args.push_back(parse_expression(true));
        if (!is_op(",")) break;
        ++tpos_;
      }
      expect_op("]");
      return e;
    }
    if (is_op("{")) {
      ++tpos_;
      auto e = make(Expr::Kind::kDict, line);
      while (!is_op("}")) {
        ExprPtr key = parse_expression(true);
        expect_op(":");
        e->args.push_back(std::move(key));
        e->args.push_back(parse_expression(true));
        if (!is_op(",")) break;
        ++tpos_;
      }
      expect_op("}");
      return e;
    }
    fail(line, fmt::format("unexpected {}", describe()));
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail(cur_line(), "unsupported: *args/**kwargs in calls");
      if (cur().type == Token::Type::kName && tpos_ + 1 < toks_->size() &&
          (*toks_)[tpos_ + 1].type == Token::Type::kOp && (*toks_)[tpos_ + 1].text == "=") {
        std::string key = next().text;
        ++tpos_;
        call.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        call.args.push_back(parse_expression(true));
      }
      if (!is_op(",")) break;
      ++tpos_;
    }
    expect_op(")");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      const int line = cur_line();
      if (is_op(".")) {
        ++tpos_;
        auto g = make(Expr::Kind::kGetAttr, line);
        if (cur().type == Token::Type::kInt) {  // `x.0` is item access
          g->kind = Expr::Kind::kGetItem;
          auto idx = make(Expr::Kind::kLiteral, line);
          idx->literal = next().value;
          g->args.push_back(std::move(e));
          g->args.push_back(std::move(idx));
        } else {
          g->name = expect_name();
          g->args.push_back(std::move(e));
        }
        e = std::move(g);
      } else if (is_op("[")) {
        ++tpos_;
        e = parse_subscript(std::move(e), line);
      } else if (is_op("(")) {
        auto c = make(Expr::Kind::kCall, line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj, int line) {
    // args: obj, start, stop, step (null = omitted) for slices; obj, index for items.
    std::vector<ExprPtr> parts(1);
    bool slice = false;
    if (!is_op(":")) parts[0] = parse_expression(true);
    while (is_op(":") && parts.size() < 3) {
      ++tpos_;
      slice = true;
      parts.emplace_back();
      if (!is_op(":") && !is_op("]")) parts.back() = parse_expression(true);
    }
    expect_op("]");
    auto e = make(slice ? Expr::Kind::kSlice : Expr::Kind::kGetItem, line);
    e->args.push_back(std::move(obj));
    if (!slice && !parts[0]) fail(line, "empty subscript");
    parts.resize(slice ? 3 : 1);
    for (auto& p : parts) e->args.push_back(std::move(p));
    return e;
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      const int line = cur_line();
      if (is_op("|")) {
        ++tpos_;
        auto f = make(Expr::Kind::kFilter, line);
        f->name = expect_name();
        while (is_op(".")) { ++tpos_; f->name += "." + expect_name(); }
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        ++tpos_;
        auto t = make(Expr::Kind::kTest, line);
        if (is_name("not")) { ++tpos_; t->negated = true; }
        t->name = expect_name();
        while (is_op(".")) { ++tpos_; t->name += "." + expect_name(); }
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else if (!at_end() && (cur().type != Token::Type::kOp || is_op("[") || is_op("{") || is_op("(")) &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("if") && !is_name("in") &&
                   !is_name("not")) {
          if (is_name("is")) fail(cur_line(), "you cannot chain multiple tests with is");
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else if (is_op("(")) {
        auto c = make(Expr::Kind::kCall, line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  std::vector<Segment> segs_;
  std::string name_;
  size_t seg_ = 0;
  const std::vector<Token>* toks_ = nullptr;
  size_t tpos_ = 0;
  int tag_line_ = 1;
};

}  // namespace

std::shared_ptr<const Template> parse(const std::string& source, const std::string& name) {
  auto t = std::make_shared<Template>();
  t->name = name;
  Parser p(Lexer(source, name).run(), name);
  t->body = p.parse_all();
  return t;
}

}  // namespace rlaif::jinja
