// Renderer of the chat-template Jinja subset: scoping like jinja2 (each loop iteration and macro call is a
// fresh frame; `set` writes the innermost one; namespaces are shared objects), Python operator semantics,
// and the filters/tests/methods/globals HF templates use. Anything else fails loudly with its line.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include <utf8proc.h>

#include "core/error.h"
#include "text/jinja.h"

namespace rlaif::jinja {

namespace {

using K = Value::Kind;

std::u32string to_u32(const std::string& s) {
  auto v = decode_utf8(s);
  return std::u32string(v.begin(), v.end());
}

std::string map_case(const std::string& s, bool upper) {
  std::u32string u = to_u32(s);
  for (auto& c : u)
    c = static_cast<char32_t>(upper ? utf8proc_toupper(static_cast<utf8proc_int32_t>(c))
                                    : utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
  return encode_utf8(u);
}

bool is_cased_upper(char32_t c) { return utf8proc_isupper(static_cast<utf8proc_int32_t>(c)); }
bool is_cased_lower(char32_t c) { return utf8proc_islower(static_cast<utf8proc_int32_t>(c)); }

// Python str.strip/lstrip/rstrip: whitespace, or any code point in `chars`.
std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::u32string u = to_u32(s);
  std::u32string set;
  const bool by_set = chars && !chars->is_none() && !chars->is_undefined();
  if (by_set) set = to_u32(chars->s);
  auto strip_it = [&](char32_t c) { return by_set ? set.find(c) != std::u32string::npos : is_py_space(c); };
  size_t b = 0, e = u.size();
  if (left) while (b < e && strip_it(u[b])) ++b;
  if (right) while (e > b && strip_it(u[e - 1])) --e;
  return encode_utf8(std::u32string_view(u).substr(b, e - b));
}

// Python str.split(sep=None, maxsplit=-1).
List py_split(const std::string& s, const Value* sep, int64_t maxsplit) {
  List out;
  if (!sep || sep->is_none()) {
    std::u32string u = to_u32(s);
    size_t k = 0;
    while (true) {
      while (k < u.size() && is_py_space(u[k])) ++k;
      if (k >= u.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit) {
        size_t e = u.size();
        while (e > k && is_py_space(u[e - 1])) --e;
        out.push_back(Value::string(encode_utf8(std::u32string_view(u).substr(k, e - k))));
        break;
      }
      size_t j = k;
      while (j < u.size() && !is_py_space(u[j])) ++j;
      out.push_back(Value::string(encode_utf8(std::u32string_view(u).substr(k, j - k))));
      k = j;
    }
    return out;
  }
  const std::string& d = sep->s;
  size_t start = 0;
  while (true) {
    const size_t at = (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit) ? std::string::npos : s.find(d, start);
    if (at == std::string::npos) {
      out.push_back(Value::string(s.substr(start)));
      return out;
    }
    out.push_back(Value::string(s.substr(start, at - start)));
    start = at + d.size();
  }
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count) {
  std::string out;
  if (old.empty()) {  // Python inserts `rep` between every code point
    std::u32string u = to_u32(s);
    int64_t n = 0;
    for (size_t k = 0; k <= u.size(); ++k) {
      if (count < 0 || n < count) { out += rep; ++n; }
      if (k < u.size()) out += encode_utf8(std::u32string_view(u).substr(k, 1));
    }
    return out;
  }
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    const size_t at = s.find(old, pos);
    if (at == std::string::npos) break;
    out += s.substr(pos, at - pos) + rep;
    pos = at + old.size();
    ++n;
  }
  return out + s.substr(pos);
}

// Python slice index normalization (for a sequence of length n).
void slice_indices(int64_t n, const Value* start, const Value* stop, int64_t step, int64_t& b, int64_t& e) {
  auto norm = [&](const Value* v, int64_t def, bool is_start) {
    if (!v || v->is_none()) return def;
    int64_t x = v->i;
    if (x < 0) x += n;
    if (step > 0) return std::clamp<int64_t>(x, 0, n);
    (void)is_start;
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  b = norm(start, step > 0 ? 0 : n - 1, true);
  e = norm(stop, step > 0 ? n : -1, false);
}

struct Frame {
  std::unordered_map<std::string, Value> vars;
};

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  Renderer(const Template& t, const std::map<std::string, Value>& vars) : t_(t) {
    frames_.emplace_back();
    install_globals();
    for (const auto& [k, v] : vars) frames_.back().vars[k] = v;
    frames_.emplace_back();  // the template's own top-level frame
  }

  std::string run() {
    std::string out;
    Flow f = exec(t_.body, out);
    RLAIF_CHECK(f == Flow::kNormal, "break/continue escaped every loop");
    return out;
  }

 private:
  [[noreturn]] void fail(int line, const std::string& msg) const {
    throw Error("chat_template", fmt::format("{}:{}: {}", t_.name, line, msg));
  }

  // ---- scopes ----
  Value lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it) {
      auto f = it->vars.find(name);
      if (f != it->vars.end()) return f->second;
    }
    return Value::undefined(name);
  }

  void assign(const std::string& target, Value v, int line) {
    const size_t dot = target.find('.');
    if (dot == std::string::npos) {
      frames_.back().vars[target] = std::move(v);
      return;
    }
    Value ns = lookup(target.substr(0, dot));
    if (ns.kind != K::kNamespace)
      fail(line, fmt::format("cannot assign attribute on non-namespace object '{}'", target.substr(0, dot)));
    ns.set(target.substr(dot + 1), std::move(v));
  }

  void assign_targets(const std::vector<std::string>& targets, const Value& v, int line) {
    if (targets.size() == 1) {
      assign(targets[0], v, line);
      return;
    }
    List items = iterate(v, line);
    if (items.size() != targets.size())
      fail(line, fmt::format("cannot unpack {} values into {} targets", items.size(), targets.size()));
    for (size_t k = 0; k < targets.size(); ++k) assign(targets[k], items[k], line);
  }

  // ---- statements ----
  Flow exec(const Body& body, std::string& out) {
    for (const auto& n : body) {
      Flow f = exec_node(*n, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow exec_node(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::Kind::kText: out += n.text; return Flow::kNormal;
      case Node::Kind::kOutput: out += to_str(eval(*n.expr)); return Flow::kNormal;
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches)
          if (eval(*cond).truthy()) return exec(body, out);
        return exec(n.else_body, out);
      case Node::Kind::kFor: return exec_for(n, out);
      case Node::Kind::kSet: assign_targets(n.targets, eval(*n.expr), n.line); return Flow::kNormal;
      case Node::Kind::kSetBlock: {
        std::string captured;
        exec(n.body, captured);
        assign(n.targets[0], Value::string(std::move(captured)), n.line);
        return Flow::kNormal;
      }
      case Node::Kind::kMacro: define_macro(n); return Flow::kNormal;
      case Node::Kind::kBreak: return Flow::kBreak;
      case Node::Kind::kContinue: return Flow::kContinue;
      case Node::Kind::kPassThrough: return exec(n.body, out);
      default: fail(n.line, "unsupported statement");
    }
  }

  Flow exec_for(const Node& n, std::string& out) {
    List items = iterate(eval(*n.expr), n.expr->line);
    if (n.filter) {  // `for x in xs if cond` filters before loop.index & co. are counted
      List kept;
      for (const auto& it : items) {
        frames_.emplace_back();
        assign_targets(n.targets, it, n.line);
        const bool keep = eval(*n.filter).truthy();
        frames_.pop_back();
        if (keep) kept.push_back(it);
      }
      items = std::move(kept);
    }
    const auto len = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < len; ++k) {
      frames_.emplace_back();
      Value loop = Value::make_dict({
          {"index", Value::integer(k + 1)}, {"index0", Value::integer(k)},
          {"revindex", Value::integer(len - k)}, {"revindex0", Value::integer(len - k - 1)},
          {"first", Value::boolean(k == 0)}, {"last", Value::boolean(k == len - 1)},
          {"length", Value::integer(len)}, {"depth", Value::integer(1)}, {"depth0", Value::integer(0)},
          {"previtem", k > 0 ? items[static_cast<size_t>(k - 1)] : Value::undefined("previtem")},
          {"nextitem", k + 1 < len ? items[static_cast<size_t>(k + 1)] : Value::undefined("nextitem")},
      });
      loop.set("cycle", Value::function("cycle", [k](CallArgs& a, int) {
                 if (a.positional.empty()) return Value::undefined("cycle");
                 return a.positional[static_cast<size_t>(k) % a.positional.size()];
               }));
      frames_.back().vars["loop"] = loop;
      assign_targets(n.targets, items[static_cast<size_t>(k)], n.line);
      Flow f = exec(n.body, out);
      frames_.pop_back();
      if (f == Flow::kBreak) break;
    }
    if (len == 0) return exec(n.else_body, out);
    return Flow::kNormal;
  }

  void define_macro(const Node& n) {
    const Node* node = &n;
    assign(n.text, Value::function(n.text, [this, node](CallArgs& a, int line) {
             frames_.emplace_back();
             for (size_t k = 0; k < node->params.size(); ++k) {
               const auto& [pname, def] = node->params[k];
               const Value* v = a.get(k, pname);
               frames_.back().vars[pname] = v ? *v : def ? eval(*def) : Value::undefined(pname);
             }
             if (a.positional.size() > node->params.size())
               fail(line, fmt::format("macro '{}' takes {} arguments, got {}", node->text, node->params.size(), a.positional.size()));
             std::string out;
             exec(node->body, out);
             frames_.pop_back();
             return Value::string(std::move(out));
           }), n.line);
  }

  // Python iteration: list items, dict keys, string code points; undefined is empty (jinja2).
  List iterate(const Value& v, int line) const {
    switch (v.kind) {
      case K::kList: return *v.list;
      case K::kDict: {
        List keys;
        for (const auto& kv : *v.dict) keys.push_back(Value::string(kv.first));
        return keys;
      }
      case K::kString: {
        List chars;
        for (char32_t c : decode_utf8(v.s)) chars.push_back(Value::string(encode_utf8(std::u32string(1, c))));
        return chars;
      }
      case K::kUndefined: return {};
      default: fail(line, fmt::format("'{}' object is not iterable", kind_name(v.kind)));
    }
  }

  // ---- expressions ----
  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral: return e.literal;
      case Expr::Kind::kName: return lookup(e.name);
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        List l;
        for (const auto& a : e.args) l.push_back(eval(*a));
        Value v = Value::make_list(std::move(l));
        v.tuple = e.kind == Expr::Kind::kTuple;
        return v;
      }
      case Expr::Kind::kDict: {
        Value d = Value::make_dict();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k]);
          if (!key.is_string()) fail(e.line, fmt::format("unsupported: dict literal key of type {}", kind_name(key.kind)));
          d.set(key.s, eval(*e.args[k + 1]));
        }
        return d;
      }
      case Expr::Kind::kGetAttr: return get_attr(eval(*e.args[0]), e.name, e.line, describe(*e.args[0]));
      case Expr::Kind::kGetItem: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line, describe(*e.args[0]));
      case Expr::Kind::kSlice: return slice(e);
      case Expr::Kind::kCall: return call(e);
      case Expr::Kind::kFilter: return filter(e);
      case Expr::Kind::kTest: {
        const bool r = test(e);
        return Value::boolean(e.negated ? !r : r);
      }
      case Expr::Kind::kNeg:
      case Expr::Kind::kPos: {
        Value v = eval(*e.args[0]);
        if (!v.is_number()) fail(e.line, fmt::format("bad operand type for unary {}: '{}'", e.kind == Expr::Kind::kNeg ? '-' : '+', kind_name(v.kind)));
        if (e.kind == Expr::Kind::kPos) return v.kind == K::kBool ? Value::integer(v.b) : v;
        if (v.kind == K::kFloat) return Value::real(-v.f);
        return Value::integer(-(v.kind == K::kBool ? int64_t(v.b) : v.i));
      }
      case Expr::Kind::kNot: return Value::boolean(!eval(*e.args[0]).truthy());
      case Expr::Kind::kAnd: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? eval(*e.args[1]) : a;
      }
      case Expr::Kind::kOr: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? a : eval(*e.args[1]);
      }
      case Expr::Kind::kBinary: return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Kind::kCompare: {
        Value left = eval(*e.args[0]);
        for (const auto& [op, rhs] : e.kwargs) {
          Value right = eval(*rhs);
          if (!compare(op, left, right, e.line)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::kCond:
        if (eval(*e.args[0]).truthy()) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value::undefined();
    }
    fail(e.line, "unsupported expression");
  }

  static std::string describe(const Expr& e) {
    if (e.kind == Expr::Kind::kName) return e.name;
    if (e.kind == Expr::Kind::kGetAttr) return describe(*e.args[0]) + "." + e.name;
    return "value";
  }

  [[noreturn]] void undefined_error(const Value& v, int line, const std::string& what) const {
    fail(line, fmt::format("'{}' is undefined", v.s.empty() ? what : v.s));
  }

  // jinja2's getattr: a Python attribute (method) first, then the item.
  Value get_attr(const Value& obj, const std::string& name, int line, const std::string& what) {
    if (obj.is_undefined()) undefined_error(obj, line, what);
    if (Value m = method(obj, name); m.kind == K::kFunction) return m;
    if ((obj.kind == K::kDict || obj.kind == K::kNamespace)) {
      if (const Value* v = obj.find(name)) return *v;
    }
    return Value::undefined(name);
  }

  // jinja2's getitem: the item first, then (for string keys) the attribute.
  Value get_item(const Value& obj, const Value& key, int line, const std::string& what) {
    if (obj.is_undefined()) undefined_error(obj, line, what);
    if (obj.kind == K::kDict || obj.kind == K::kNamespace) {
      if (key.is_string()) {
        if (const Value* v = obj.find(key.s)) return *v;
        return get_attr(obj, key.s, line, what);
      }
      return Value::undefined();
    }
    if ((obj.kind == K::kList || obj.kind == K::kString) && (key.kind == K::kInt || key.kind == K::kBool)) {
      const int64_t raw = key.kind == K::kBool ? int64_t(key.b) : key.i;
      if (obj.kind == K::kList) {
        const auto n = static_cast<int64_t>(obj.list->size());
        const int64_t idx = raw < 0 ? raw + n : raw;
        if (idx < 0 || idx >= n) return Value::undefined();
        return (*obj.list)[static_cast<size_t>(idx)];
      }
      std::u32string u = to_u32(obj.s);
      const auto n = static_cast<int64_t>(u.size());
      const int64_t idx = raw < 0 ? raw + n : raw;
      if (idx < 0 || idx >= n) return Value::undefined();
      return Value::string(encode_utf8(std::u32string(1, u[static_cast<size_t>(idx)])));
    }
    if (key.is_string()) return get_attr(obj, key.s, line, what);
    return Value::undefined();
  }

  Value slice(const Expr& e) {
    Value obj = eval(*e.args[0]);
    Value parts[3];
    for (int k = 0; k < 3; ++k) {
      parts[k] = e.args[1 + k] ? eval(*e.args[1 + k]) : Value::none();
      if (parts[k].kind == K::kBool) parts[k] = Value::integer(parts[k].b);
      if (!parts[k].is_none() && parts[k].kind != K::kInt) fail(e.line, "slice indices must be integers or None");
    }
    const int64_t step = parts[2].is_none() ? 1 : parts[2].i;
    if (step == 0) fail(e.line, "slice step cannot be zero");
    auto pick = [&](int64_t n, auto&& take) {
      int64_t b, en;
      slice_indices(n, &parts[0], &parts[1], step, b, en);
      for (int64_t k = b; step > 0 ? k < en : k > en; k += step) take(static_cast<size_t>(k));
    };
    if (obj.kind == K::kList) {
      List out;
      pick(static_cast<int64_t>(obj.list->size()), [&](size_t k) { out.push_back((*obj.list)[k]); });
      return Value::make_list(std::move(out));
    }
    if (obj.kind == K::kString) {
      std::u32string u = to_u32(obj.s), out;
      pick(static_cast<int64_t>(u.size()), [&](size_t k) { out += u[k]; });
      return Value::string(encode_utf8(out));
    }
    if (obj.is_undefined()) undefined_error(obj, e.line, describe(*e.args[0]));
    fail(e.line, fmt::format("'{}' object is not subscriptable", kind_name(obj.kind)));
  }

  CallArgs eval_args(const Expr& e, size_t skip) {
    CallArgs a;
    for (size_t k = skip; k < e.args.size(); ++k) a.positional.push_back(eval(*e.args[k]));
    for (const auto& [name, ex] : e.kwargs) a.keyword.emplace_back(name, eval(*ex));
    return a;
  }

  Value call(const Expr& e) {
    Value fn = eval(*e.args[0]);
    if (fn.kind != K::kFunction) {
      if (fn.is_undefined()) undefined_error(fn, e.line, describe(*e.args[0]));
      fail(e.line, fmt::format("'{}' is not callable ({})", describe(*e.args[0]), kind_name(fn.kind)));
    }
    CallArgs a = eval_args(e, 1);
    return (*fn.fn)(a, e.line);
  }

  // ---- operators ----
  static double num(const Value& v) { return v.kind == K::kFloat ? v.f : v.kind == K::kBool ? double(v.b) : double(v.i); }
  static int64_t inum(const Value& v) { return v.kind == K::kBool ? int64_t(v.b) : v.i; }

  Value binary(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value::string(to_str(a) + to_str(b));
    if (a.is_undefined() || b.is_undefined()) undefined_error(a.is_undefined() ? a : b, line, "value");
    const bool nums = a.is_number() && b.is_number();
    const bool floats = nums && (a.kind == K::kFloat || b.kind == K::kFloat);
    if (op == "+") {
      if (nums) return floats ? Value::real(num(a) + num(b)) : Value::integer(inum(a) + inum(b));
      if (a.is_string() && b.is_string()) return Value::string(a.s + b.s);
      if (a.kind == K::kList && b.kind == K::kList) {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::make_list(std::move(l));
      }
    } else if (op == "-" && nums) {
      return floats ? Value::real(num(a) - num(b)) : Value::integer(inum(a) - inum(b));
    } else if (op == "*") {
      if (nums) return floats ? Value::real(num(a) * num(b)) : Value::integer(inum(a) * inum(b));
      const Value* seq = a.is_number() ? &b : &a;
      const Value* cnt = a.is_number() ? &a : &b;
      if (cnt->is_number() && cnt->kind != K::kFloat && (seq->is_string() || seq->kind == K::kList)) {
        const int64_t n = std::max<int64_t>(0, inum(*cnt));
        if (seq->is_string()) {
          std::string s;
          for (int64_t k = 0; k < n; ++k) s += seq->s;
          return Value::string(std::move(s));
        }
        List l;
        for (int64_t k = 0; k < n; ++k) l.insert(l.end(), seq->list->begin(), seq->list->end());
        return Value::make_list(std::move(l));
      }
    } else if (nums && (op == "/" || op == "//" || op == "%")) {
      if (num(b) == 0) fail(line, "division by zero");
      if (op == "/") return Value::real(num(a) / num(b));
      if (floats) {
        const double q = std::floor(num(a) / num(b));
        return op == "//" ? Value::real(q) : Value::real(num(a) - q * num(b));
      }
      const int64_t x = inum(a), y = inum(b);
      int64_t q = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;  // floor division like Python
      return op == "//" ? Value::integer(q) : Value::integer(x - q * y);
    } else if (op == "**" && nums) {
      if (!floats && inum(b) >= 0) {
        int64_t r = 1;
        for (int64_t k = 0; k < inum(b); ++k) r *= inum(a);
        return Value::integer(r);
      }
      return Value::real(std::pow(num(a), num(b)));
    }
    fail(line, fmt::format("unsupported operand type(s) for {}: '{}' and '{}'", op, kind_name(a.kind), kind_name(b.kind)));
  }

  // Python ordering: numbers, strings (code point order = UTF-8 byte order) and lists.
  int order(const Value& a, const Value& b, const std::string& op, int line) {
    if (a.is_number() && b.is_number()) return num(a) < num(b) ? -1 : num(a) > num(b) ? 1 : 0;
    if (a.is_string() && b.is_string()) return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
    if (a.kind == K::kList && b.kind == K::kList) {
      for (size_t k = 0; k < std::min(a.list->size(), b.list->size()); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return order((*a.list)[k], (*b.list)[k], op, line);
      return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
    }
    fail(line, fmt::format("'{}' not supported between instances of '{}' and '{}'", op, kind_name(a.kind), kind_name(b.kind)));
  }

  bool contains(const Value& hay, const Value& needle, int line) {
    switch (hay.kind) {
      case K::kString:
        if (!needle.is_string()) fail(line, fmt::format("'in <string>' requires string as left operand, not {}", kind_name(needle.kind)));
        return hay.s.find(needle.s) != std::string::npos;
      case K::kList:
        return std::any_of(hay.list->begin(), hay.list->end(), [&](const Value& v) { return equal(v, needle); });
      case K::kDict: return needle.is_string() && hay.find(needle.s) != nullptr;
      case K::kUndefined: return false;
      default: fail(line, fmt::format("argument of type '{}' is not iterable", kind_name(hay.kind)));
    }
  }

  bool compare(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(b, a, line);
    if (op == "not in") return !contains(b, a, line);
    const int c = order(a, b, op, line);
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  // ---- methods of built-in types (what jinja2's sandbox lets templates call) ----
  Value method(const Value& obj, const std::string& name) {
    static const std::vector<std::string> kStr = {"startswith", "endswith", "strip", "lstrip", "rstrip", "split",
                                                  "rsplit", "replace", "lower", "upper", "title", "capitalize",
                                                  "find", "rfind", "count", "join", "isdigit", "isalpha", "isalnum",
                                                  "isspace", "islower", "isupper", "format", "splitlines", "index",
                                                  "rindex", "center", "ljust", "rjust", "zfill", "encode",
                                                  "partition", "rpartition", "casefold", "swapcase", "expandtabs"};
    static const std::vector<std::string> kDict = {"items", "keys", "values", "get", "pop", "popitem", "update",
                                                   "setdefault", "clear", "copy", "fromkeys"};
    static const std::vector<std::string> kList = {"append", "extend", "insert", "pop", "remove", "clear", "copy",
                                                   "count", "index", "reverse", "sort"};
    auto has = [&](const std::vector<std::string>& v) { return std::find(v.begin(), v.end(), name) != v.end(); };
    const char* type = nullptr;
    if (obj.is_string() && has(kStr)) type = "str";
    else if (obj.kind == K::kDict && has(kDict)) type = "dict";
    else if (obj.kind == K::kList && has(kList)) type = "list";
    if (!type) return Value::undefined(name);
    Value self = obj;
    std::string tname = type;
    return Value::function(name, [this, self, name, tname](CallArgs& a, int line) {
      return call_method(self, tname, name, a, line);
    });
  }

  static const Value& need_string(const Value* v, const std::string& what, int line, const Renderer& r) {
    if (!v || !v->is_string()) r.fail(line, fmt::format("{} expects a string argument", what));
    return *v;
  }

  Value call_method(const Value& self, const std::string& type, const std::string& name, CallArgs& a, int line) {
    const std::string what = type + "." + name + "()";
    if (type == "str") {
      const std::string& s = self.s;
      if (name == "startswith" || name == "endswith") {
        const Value* arg = a.get(0, "prefix");
        if (!arg) fail(line, what + " takes at least 1 argument");
        if (a.positional.size() > 1) fail(line, "unsupported: start/end arguments of " + what);
        List cands = arg->kind == K::kList ? *arg->list : List{*arg};
        for (const auto& c : cands) {
          const std::string& p = need_string(&c, what, line, *this).s;
          if (p.size() <= s.size() &&
              (name == "startswith" ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0))
            return Value::boolean(true);
        }
        return Value::boolean(false);
      }
      if (name == "strip" || name == "lstrip" || name == "rstrip")
        return Value::string(py_strip(s, a.get(0, "chars"), name != "rstrip", name != "lstrip"));
      if (name == "split" || (name == "rsplit" && !a.get(1, "maxsplit"))) {
        const Value* mx = a.get(1, "maxsplit");
        return Value::make_list(py_split(s, a.get(0, "sep"), mx ? inum(*mx) : -1));
      }
      if (name == "replace") {
        const Value* c = a.get(2, "count");
        return Value::string(py_replace(s, need_string(a.get(0, "old"), what, line, *this).s,
                                        need_string(a.get(1, "new"), what, line, *this).s, c ? inum(*c) : -1));
      }
      if (name == "lower" || name == "upper") return Value::string(map_case(s, name == "upper"));
      if (name == "title" || name == "capitalize") return Value::string(title_case(s, name == "title"));
      if (name == "find" || name == "rfind") {
        const std::string& sub = need_string(a.get(0, "sub"), what, line, *this).s;
        const size_t at = name == "find" ? s.find(sub) : s.rfind(sub);
        if (at == std::string::npos) return Value::integer(-1);
        return Value::integer(static_cast<int64_t>(decode_utf8(s.substr(0, at)).size()));
      }
      if (name == "count") {
        const std::string& sub = need_string(a.get(0, "sub"), what, line, *this).s;
        if (sub.empty()) return Value::integer(static_cast<int64_t>(decode_utf8(s).size()) + 1);
        int64_t n = 0;
        for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) ++n;
        return Value::integer(n);
      }
      if (name == "join") {
        const Value* it = a.get(0, "iterable");
        if (!it) fail(line, what + " takes exactly one argument");
        std::string out;
        List items = iterate(*it, line);
        for (size_t k = 0; k < items.size(); ++k) {
          if (!items[k].is_string()) fail(line, fmt::format("{}: sequence item {}: expected str instance, {} found", what, k, kind_name(items[k].kind)));
          out += (k ? s : "") + items[k].s;
        }
        return Value::string(std::move(out));
      }
      if (name.rfind("is", 0) == 0) {
        auto u = decode_utf8(s);
        if (u.empty()) return Value::boolean(false);
        auto all = [&](auto pred) { return Value::boolean(std::all_of(u.begin(), u.end(), pred)); };
        if (name == "isspace") return all(is_py_space);
        auto cat = [](char32_t c) { return utf8proc_category(static_cast<utf8proc_int32_t>(c)); };
        auto alpha = [&](char32_t c) { return cat(c) >= UTF8PROC_CATEGORY_LU && cat(c) <= UTF8PROC_CATEGORY_LO; };
        auto digit = [&](char32_t c) { return cat(c) == UTF8PROC_CATEGORY_ND; };
        if (name == "isdigit") return all(digit);
        if (name == "isalpha") return all(alpha);
        if (name == "isalnum") return all([&](char32_t c) { return alpha(c) || (cat(c) >= UTF8PROC_CATEGORY_ND && cat(c) <= UTF8PROC_CATEGORY_NO); });
        bool any_cased = false, ok = true;
        for (char32_t c : u) {
          if (is_cased_upper(c) || is_cased_lower(c)) any_cased = true;
          if (name == "islower" ? is_cased_upper(c) : is_cased_lower(c)) ok = false;
        }
        return Value::boolean(any_cased && ok);
      }
    } else if (type == "dict") {
      if (name == "items" || name == "keys" || name == "values") {
        List out;
        for (const auto& [k, v] : *self.dict) {
          if (name == "items") {
            out.push_back(Value::make_list({Value::string(k), v}));
            out.back().tuple = true;
          }
          else out.push_back(name == "keys" ? Value::string(k) : v);
        }
        return Value::make_list(std::move(out));
      }
      if (name == "get") {
        const Value* key = a.get(0, "key");
        const Value* def = a.get(1, "default");
        const Value* found = key && key->is_string() ? self.find(key->s) : nullptr;
        return found ? *found : def ? *def : Value::none();
      }
    } else if (type == "list") {
      if (name == "count") {
        const Value* x = a.get(0, "value");
        if (!x) fail(line, what + " takes exactly one argument");
        return Value::integer(std::count_if(self.list->begin(), self.list->end(), [&](const Value& v) { return equal(v, *x); }));
      }
    }
    fail(line, fmt::format("unsupported method {} (the sandbox forbids mutation; others are not implemented)", what));
  }

  static std::string title_case(const std::string& s, bool every_word) {
    std::u32string u = to_u32(s);
    bool prev_cased = false;
    for (size_t k = 0; k < u.size(); ++k) {
      const auto c = static_cast<utf8proc_int32_t>(u[k]);
      const bool start = every_word ? !prev_cased : k == 0;
      u[k] = static_cast<char32_t>(start ? utf8proc_toupper(c) : utf8proc_tolower(c));
      prev_cased = is_cased_upper(u[k]) || is_cased_lower(u[k]);
    }
    return encode_utf8(u);
  }

  // ---- filters ----
  Value filter(const Expr& e) {
    Value v = eval(*e.args[0]);
    CallArgs a = eval_args(e, 1);
    return apply_filter(e.name, v, a, e.line);
  }

  Value apply_filter(const std::string& name, const Value& v, CallArgs& a, int line) {
    auto arg = [&](size_t i, const char* n) { return a.get(i, n); };
    if (name == "tojson") {
      // transformers' override: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
      JsonOptions opt;
      if (const Value* x = arg(0, "ensure_ascii")) opt.ensure_ascii = x->truthy();
      if (const Value* x = arg(1, "indent"); x && !x->is_none()) {
        if (x->kind != K::kInt) fail(line, "tojson: only integer indent is supported");
        opt.indent = static_cast<int>(x->i);
        opt.item_sep = ",";
      }
      if (const Value* x = arg(2, "separators"); x && !x->is_none()) {
        if (x->kind != K::kList || x->list->size() != 2 || !(*x->list)[0].is_string() || !(*x->list)[1].is_string())
          fail(line, "tojson: separators must be a pair of strings");
        opt.item_sep = (*x->list)[0].s;
        opt.key_sep = (*x->list)[1].s;
      }
      if (const Value* x = arg(3, "sort_keys")) opt.sort_keys = x->truthy();
      if (v.is_undefined()) undefined_error(v, line, "value");
      try {
        return Value::string(to_json(v, opt));
      } catch (const Error& err) {
        fail(line, err.what());
      }
    }
    if (name == "trim") return Value::string(py_strip(to_str(v), arg(0, "chars"), true, true));
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case K::kString: return Value::integer(static_cast<int64_t>(decode_utf8(v.s).size()));
        case K::kList: return Value::integer(static_cast<int64_t>(v.list->size()));
        case K::kDict: return Value::integer(static_cast<int64_t>(v.dict->size()));
        case K::kUndefined: return Value::integer(0);
        default: fail(line, fmt::format("object of type '{}' has no len()", kind_name(v.kind)));
      }
    }
    if (name == "default" || name == "d") {
      const Value* boolean = arg(1, "boolean");
      const bool use_default = v.is_undefined() || (boolean && boolean->truthy() && !v.truthy());
      if (!use_default) return v;
      const Value* def = arg(0, "default_value");
      return def ? *def : Value::string("");
    }
    if (name == "first" || name == "last") {
      List items = iterate(v, line);
      if (items.empty()) return Value::undefined(name);
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      const Value* sep = arg(0, "d");
      const Value* attr = arg(1, "attribute");
      std::string out;
      List items = iterate(v, line);
      for (size_t k = 0; k < items.size(); ++k) {
        if (k && sep) out += to_str(*sep);
        out += to_str(attr ? get_attr(items[k], to_str(*attr), line, "item") : items[k]);
      }
      return Value::string(std::move(out));
    }
    if (name == "items") {
      if (v.is_undefined()) return Value::make_list();
      if (v.kind != K::kDict) fail(line, fmt::format("items filter: can only get item pairs from a mapping, not {}", kind_name(v.kind)));
      CallArgs none;
      return call_method(v, "dict", "items", none, line);
    }
    if (name == "lower" || name == "upper") return Value::string(map_case(to_str(v), name == "upper"));
    if (name == "capitalize" || name == "title") return Value::string(title_case(to_str(v), name == "title"));
    if (name == "replace") {
      const Value* c = arg(2, "count");
      return Value::string(py_replace(to_str(v), to_str(*need(arg(0, "old"), name, line)),
                                      to_str(*need(arg(1, "new"), name, line)), c && !c->is_none() ? inum(*c) : -1));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attr = name.find("attr") != std::string::npos;
      const bool keep_if = name.rfind("select", 0) == 0;
      size_t next = 0;
      std::string attr;
      if (by_attr) attr = to_str(*need(arg(next++, "attribute"), name, line));
      List out;
      for (const auto& item : iterate(v, line)) {
        Value x = by_attr ? get_attr(item, attr, line, "item") : item;
        bool r;
        if (a.positional.size() > next) {
          CallArgs targs;
          targs.positional.assign(a.positional.begin() + static_cast<long>(next) + 1, a.positional.end());
          r = apply_test(to_str(a.positional[next]), x, targs, line);
        } else {
          r = x.truthy();
        }
        if (r == keep_if) out.push_back(item);
      }
      return Value::make_list(std::move(out));
    }
    if (name == "map") {
      List out;
      const Value* attr = a.get(99, "attribute");
      for (const auto& item : iterate(v, line)) {
        if (attr) {
          Value x = get_attr(item, to_str(*attr), line, "item");
          const Value* def = a.get(99, "default");
          out.push_back(x.is_undefined() && def ? *def : x);
        } else {
          if (a.positional.empty()) fail(line, "map: needs a filter name or attribute=");
          CallArgs fargs;
          fargs.positional.assign(a.positional.begin() + 1, a.positional.end());
          fargs.keyword = a.keyword;
          out.push_back(apply_filter(to_str(a.positional[0]), item, fargs, line));
        }
      }
      return Value::make_list(std::move(out));
    }
    if (name == "list") return Value::make_list(iterate(v, line));
    if (name == "string") return Value::string(to_str(v));
    if (name == "safe") return v;
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : to_str(v)) {
        switch (c) {
          case '&': out += "&amp;"; break;
          case '<': out += "&lt;"; break;
          case '>': out += "&gt;"; break;
          case '"': out += "&#34;"; break;
          case '\'': out += "&#39;"; break;
          default: out += c;
        }
      }
      return Value::string(std::move(out));
    }
    if (name == "int" || name == "float") {
      const Value* def = arg(0, "default");
      const bool want_int = name == "int";
      Value fallback = def ? *def : want_int ? Value::integer(0) : Value::real(0.0);
      if (v.is_number()) return want_int ? Value::integer(v.kind == K::kFloat ? int64_t(v.f) : inum(v)) : Value::real(num(v));
      if (v.is_string()) {
        const std::string t = py_strip(v.s, nullptr, true, true);
        try {
          size_t used = 0;
          if (want_int) {
            const int64_t x = std::stoll(t, &used);
            if (used == t.size()) return Value::integer(x);
            const double d = std::stod(t, &used);  // jinja2's int filter also accepts "3.7"
            if (used == t.size()) return Value::integer(int64_t(d));
          } else {
            const double d = std::stod(t, &used);
            if (used == t.size()) return Value::real(d);
          }
        } catch (const std::exception&) {
        }
      }
      return fallback;
    }
    if (name == "abs") {
      if (!v.is_number()) fail(line, fmt::format("bad operand type for abs(): '{}'", kind_name(v.kind)));
      return v.kind == K::kFloat ? Value::real(std::fabs(v.f)) : Value::integer(std::llabs(inum(v)));
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string u = to_u32(v.s);
        std::reverse(u.begin(), u.end());
        return Value::string(encode_utf8(u));
      }
      List items = iterate(v, line);
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (name == "sort") {
      const Value* rev = arg(0, "reverse");
      const Value* cs = arg(1, "case_sensitive");
      const Value* attr = arg(2, "attribute");
      List items = iterate(v, line);
      auto key = [&](const Value& x) {
        Value k = attr ? get_attr(x, to_str(*attr), line, "item") : x;
        if (k.is_string() && !(cs && cs->truthy())) k.s = map_case(k.s, false);
        return k;
      };
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) { return order(key(x), key(y), "<", line) < 0; });
      if (rev && rev->truthy()) std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (name == "unique") {
      List out;
      for (const auto& x : iterate(v, line))
        if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equal(x, y); })) out.push_back(x);
      return Value::make_list(std::move(out));
    }
    fail(line, fmt::format("unknown filter '{}'", name));
  }

  const Value* need(const Value* v, const std::string& what, int line) const {
    if (!v) fail(line, fmt::format("{}: missing argument", what));
    return v;
  }

  // ---- tests ----
  bool test(const Expr& e) {
    Value v = eval(*e.args[0]);
    CallArgs a = eval_args(e, 1);
    return apply_test(e.name, v, a, line_of(e));
  }
  static int line_of(const Expr& e) { return e.line; }

  bool apply_test(const std::string& name, const Value& v, CallArgs& a, int line) {
    const Value* arg = a.get(0, "other");
    auto need_arg = [&]() -> const Value& {
      if (!arg) fail(line, fmt::format("test '{}' needs an argument", name));
      return *arg;
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "boolean") return v.kind == K::kBool;
    if (name == "true") return v.kind == K::kBool && v.b;
    if (name == "false") return v.kind == K::kBool && !v.b;
    if (name == "string") return v.is_string();
    if (name == "number") return v.is_number();
    if (name == "integer") return v.kind == K::kInt;
    if (name == "float") return v.kind == K::kFloat;
    if (name == "mapping") return v.kind == K::kDict;
    if (name == "iterable") return v.kind == K::kList || v.kind == K::kDict || v.is_string() || v.is_undefined();
    if (name == "sequence") return v.kind == K::kList || v.kind == K::kDict || v.is_string() || v.is_undefined();
    if (name == "callable") return v.kind == K::kFunction;
    if (name == "lower" || name == "upper") {
      CallArgs none;
      return v.is_string() && call_method(v, "str", name == "lower" ? "islower" : "isupper", none, line).b;
    }
    if (name == "sameas") {
      const Value& o = need_arg();
      if (v.kind != o.kind) return false;
      if (v.kind == K::kList) return v.list == o.list;
      if (v.kind == K::kDict || v.kind == K::kNamespace) return v.dict == o.dict;
      return equal(v, o);
    }
    if (name == "equalto" || name == "eq" || name == "==") return equal(v, need_arg());
    if (name == "ne" || name == "!=") return !equal(v, need_arg());
    if (name == "lt" || name == "lessthan" || name == "<") return order(v, need_arg(), "<", line) < 0;
    if (name == "le" || name == "<=") return order(v, need_arg(), "<=", line) <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return order(v, need_arg(), ">", line) > 0;
    if (name == "ge" || name == ">=") return order(v, need_arg(), ">=", line) >= 0;
    if (name == "in") return contains(need_arg(), v, line);
    if (name == "even" || name == "odd" || name == "divisibleby") {
      if (v.kind != K::kInt && v.kind != K::kBool) fail(line, fmt::format("test '{}' needs an integer", name));
      const int64_t m = name == "divisibleby" ? inum(need_arg()) : 2;
      if (m == 0) fail(line, "divisibleby 0");
      const bool div = inum(v) % m == 0;
      return name == "odd" ? !div : div;
    }
    fail(line, fmt::format("unknown test '{}'", name));
  }

  // ---- globals ----
  void install_globals() {
    auto& g = frames_.back().vars;
    const std::string tname = t_.name;
    g["raise_exception"] = Value::function("raise_exception", [tname](CallArgs& a, int line) -> Value {
      const std::string msg = a.positional.empty() ? "" : to_str(a.positional[0]);
      throw Error("chat_template", fmt::format("{}:{}: raise_exception: {}", tname, line, msg),
                  "the template rejected these messages");
    });
    g["strftime_now"] = Value::function("strftime_now", [this](CallArgs& a, int line) {
      const Value* f = a.get(0, "format");
      if (!f || !f->is_string()) fail(line, "strftime_now(format) needs a format string");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[512];
      const size_t n = std::strftime(buf, sizeof buf, f->s.c_str(), &tm);
      return Value::string(std::string(buf, n));
    });
    g["namespace"] = Value::function("namespace", [this](CallArgs& a, int line) {
      Value ns = Value::make_namespace();
      for (const auto& p : a.positional) {
        if (p.kind != K::kDict) fail(line, "namespace() positional argument must be a dict");
        for (const auto& [k, v] : *p.dict) ns.set(k, v);
      }
      for (const auto& [k, v] : a.keyword) ns.set(k, v);
      return ns;
    });
    g["dict"] = Value::function("dict", [this](CallArgs& a, int line) {
      if (!a.positional.empty()) fail(line, "unsupported: positional arguments to dict()");
      Value d = Value::make_dict();
      for (const auto& [k, v] : a.keyword) d.set(k, v);
      return d;
    });
    g["range"] = Value::function("range", [this](CallArgs& a, int line) {
      std::vector<int64_t> p;
      for (const auto& x : a.positional) {
        if (x.kind != K::kInt && x.kind != K::kBool) fail(line, "range() arguments must be integers");
        p.push_back(inum(x));
      }
      if (p.empty() || p.size() > 3) fail(line, "range() takes 1 to 3 arguments");
      const int64_t start = p.size() > 1 ? p[0] : 0, stop = p.size() > 1 ? p[1] : p[0], step = p.size() > 2 ? p[2] : 1;
      if (step == 0) fail(line, "range() step must not be zero");
      List out;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        out.push_back(Value::integer(k));
        if (out.size() > 1000000) fail(line, "range() too large");
      }
      return Value::make_list(std::move(out));
    });
  }

  const Template& t_;
  std::vector<Frame> frames_;
};

}  // namespace

std::string render(const Template& tmpl, const std::map<std::string, Value>& vars) {
  Renderer r(tmpl, vars);
  return r.run();
}

}  // namespace rlaif::jinja
