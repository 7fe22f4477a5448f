// Values of the chat-template interpreter with Python's semantics: truthiness, equality, str()/repr()
// (shortest round-trip floats) and json.dumps spacing/escaping, because templates print these byte for byte.
#include <algorithm>
#include <charconv>
#include <cmath>

#include "core/error.h"
#include "text/jinja.h"
#include "text/utf8.h"

namespace rlaif::jinja {

namespace {

template <typename Json>
Value value_from_json(const Json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: return Value::integer(static_cast<int64_t>(j.template get<uint64_t>()));
    case nlohmann::json::value_t::number_float: return Value::real(j.template get<double>());
    case nlohmann::json::value_t::string: return Value::string(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      List l;
      for (const auto& e : j) l.push_back(value_from_json(e));
      return Value::make_list(std::move(l));
    }
    case nlohmann::json::value_t::object: {
      Dict d;
      for (auto it = j.begin(); it != j.end(); ++it) d.emplace_back(it.key(), value_from_json(it.value()));
      return Value::make_dict(std::move(d));
    }
    default: throw Error("chat_template", "unsupported JSON value (binary) in template variables");
  }
}

std::string hex(unsigned v, int width) { return fmt::format("{:0{}x}", v, width); }

std::string str_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : decode_utf8(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {  // Python's non-printables in Latin-1
      out += "\\x" + hex(c, 2);
    } else {
      append_utf8(out, c);
    }
  }
  return out + quote;
}

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (char32_t c : decode_utf8(s)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || (ensure_ascii && c > 0x7E)) {
          if (c >= 0x10000) {  // UTF-16 surrogate pair, as Python writes it
            const char32_t v = c - 0x10000;
            out += "\\u" + hex(0xD800 + (v >> 10), 4) + "\\u" + hex(0xDC00 + (v & 0x3FF), 4);
          } else {
            out += "\\u" + hex(c, 4);
          }
        } else {
          append_utf8(out, c);
        }
    }
  }
  out += '"';
}

void json_dump(std::string& out, const Value& v, const JsonOptions& opt, int level) {
  using K = Value::Kind;
  auto newline = [&](int lvl) {
    if (opt.indent >= 0) out += "\n" + std::string(static_cast<size_t>(opt.indent * lvl), ' ');
  };
  switch (v.kind) {
    case K::kNone: out += "null"; return;
    case K::kBool: out += v.b ? "true" : "false"; return;
    case K::kInt: out += std::to_string(v.i); return;
    case K::kFloat:
      if (std::isnan(v.f)) out += "NaN";
      else if (std::isinf(v.f)) out += v.f > 0 ? "Infinity" : "-Infinity";
      else out += float_repr(v.f);
      return;
    case K::kString: json_string(out, v.s, opt.ensure_ascii); return;
    case K::kList: {
      if (v.list->empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += opt.item_sep;
        newline(level + 1);
        json_dump(out, (*v.list)[k], opt, level + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case K::kDict: {
      if (v.dict->empty()) { out += "{}"; return; }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : *v.dict) items.push_back(&kv);
      if (opt.sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += opt.item_sep;
        newline(level + 1);
        json_string(out, items[k]->first, opt.ensure_ascii);
        out += opt.key_sep;
        json_dump(out, items[k]->second, opt, level + 1);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      throw Error("chat_template", fmt::format("tojson: object of type {} is not JSON serializable", kind_name(v.kind)));
  }
}

}  // namespace

Value Value::from_json(const nlohmann::json& j) { return value_from_json(j); }
Value Value::from_json(const nlohmann::ordered_json& j) { return value_from_json(j); }

bool Value::truthy() const {
  switch (kind) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool: return b;
    case Kind::kInt: return i != 0;
    case Kind::kFloat: return f != 0;
    case Kind::kString: return !s.empty();
    case Kind::kList: return !list->empty();
    case Kind::kDict: return !dict->empty();
    default: return true;
  }
}

const Value* Value::find(const std::string& key) const {
  if (!dict) return nullptr;
  for (const auto& kv : *dict)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

void Value::set(const std::string& key, Value v) {
  for (auto& kv : *dict)
    if (kv.first == key) { kv.second = std::move(v); return; }
  dict->emplace_back(key, std::move(v));
}

const Value* CallArgs::get(size_t index, const std::string& name) const {
  for (const auto& kv : keyword)
    if (kv.first == name) return &kv.second;
  return index < positional.size() ? &positional[index] : nullptr;
}

const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::kUndefined: return "Undefined";
    case Value::Kind::kNone: return "NoneType";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kList: return "list";
    case Value::Kind::kDict: return "dict";
    case Value::Kind::kNamespace: return "Namespace";
    case Value::Kind::kFunction: return "function";
  }
  return "?";
}

std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);  // shortest round-trip
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') { sign = "-"; sci.erase(0, 1); }
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int decpt = std::stoi(sci.substr(e + 1)) + 1;  // value = 0.DIGITS * 10^decpt
  const int nd = static_cast<int>(digits.size());
  // Python's repr switches to exponent notation outside -4 < decpt <= 16.
  if (decpt <= -4 || decpt > 16) {
    std::string m = digits.substr(0, 1);
    if (nd > 1) m += "." + digits.substr(1);
    const int exp = decpt - 1;
    return sign + m + fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  }
  if (decpt <= 0) return sign + "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
  if (decpt < nd) return sign + digits.substr(0, static_cast<size_t>(decpt)) + "." + digits.substr(static_cast<size_t>(decpt));
  return sign + digits + std::string(static_cast<size_t>(decpt - nd), '0') + ".0";
}

std::string repr(const Value& v) {
  using K = Value::Kind;
  switch (v.kind) {
    case K::kUndefined: return "Undefined";
    case K::kNone: return "None";
    case K::kBool: return v.b ? "True" : "False";
    case K::kInt: return std::to_string(v.i);
    case K::kFloat: return float_repr(v.f);
    case K::kString: return str_repr(v.s);
    case K::kList: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
      if (v.tuple) return out + (v.list->size() == 1 ? ",)" : ")");
      return out + "]";
    }
    case K::kDict:
    case K::kNamespace: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->size(); ++k)
        out += (k ? ", " : "") + str_repr((*v.dict)[k].first) + ": " + repr((*v.dict)[k].second);
      out += "}";
      return v.kind == K::kNamespace ? "<Namespace " + out + ">" : out;
    }
    case K::kFunction: return "<function " + v.s + ">";
  }
  return "";
}

std::string to_str(const Value& v) {
  if (v.kind == Value::Kind::kString) return v.s;
  if (v.kind == Value::Kind::kUndefined) return "";
  return repr(v);
}

std::string to_json(const Value& v, const JsonOptions& opt) {
  std::string out;
  json_dump(out, v, opt, 0);
  return out;
}

bool equal(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.kind == K::kFloat || b.kind == K::kFloat) {
      auto num = [](const Value& x) { return x.kind == K::kFloat ? x.f : x.kind == K::kBool ? double(x.b) : double(x.i); };
      return num(a) == num(b);
    }
    auto num = [](const Value& x) { return x.kind == K::kBool ? int64_t(x.b) : x.i; };
    return num(a) == num(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case K::kUndefined:
    case K::kNone: return true;
    case K::kString: return a.s == b.s;
    case K::kList:
      if (a.tuple != b.tuple || a.list->size() != b.list->size()) return false;  // (1,) != [1] in Python
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case K::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& kv : *a.dict) {
        const Value* other = b.find(kv.first);
        if (!other || !equal(kv.second, *other)) return false;
      }
      return true;
    case K::kNamespace: return a.dict == b.dict;
    case K::kFunction: return a.fn == b.fn;
    default: return false;
  }
}

std::vector<char32_t> decode_utf8(const std::string& s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  for (size_t k = 0; k < s.size();) {
    const auto c = static_cast<unsigned char>(s[k]);
    int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (n < 0 || (n > 0 && k + static_cast<size_t>(n) >= s.size())) {  // invalid lead byte or truncated
      out.push_back(0xFFFD);
      ++k;
      continue;
    }
    char32_t cp = n == 0 ? c : c & (0x3F >> n);
    bool ok = true;
    for (int t = 1; t <= n; ++t) {
      const auto cc = static_cast<unsigned char>(s[k + static_cast<size_t>(t)]);
      if ((cc & 0xC0) != 0x80) { ok = false; break; }
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) { out.push_back(0xFFFD); ++k; continue; }
    out.push_back(cp);
    k += static_cast<size_t>(n) + 1;
  }
  return out;
}

std::string encode_utf8(const std::u32string_view& cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t c : cps) append_utf8(out, c);
  return out;
}

bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace rlaif::jinja
