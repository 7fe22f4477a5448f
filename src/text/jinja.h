// A Jinja2-subset interpreter for chat templates: values with Python semantics, the AST, the parser and the
// renderer. Output must equal jinja2's under Hugging Face's settings (trim_blocks, lstrip_blocks, HF tojson),
// so every rule here mirrors Python/jinja2 behaviour, and anything unsupported is an error, never a guess.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace rlaif::jinja {

struct Value;
using List = std::vector<Value>;
// Python dicts keep insertion order; keys are strings (all that JSON and chat templates produce).
using Dict = std::vector<std::pair<std::string, Value>>;
struct CallArgs;
// A callable value (global function, macro or bound method); `line` is the call site for errors.
using Function = std::function<Value(CallArgs& args, int line)>;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kFunction };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;                   // string, or the missing name for undefined, or a function's name
  std::shared_ptr<List> list;      // lists and tuples
  bool tuple = false;              // a list that prints as a Python tuple: (1, 2)
  std::shared_ptr<Dict> dict;      // dicts and namespaces (namespaces are mutable, shared by reference)
  std::shared_ptr<Function> fn;

  static Value undefined(std::string name = "") { Value v; v.s = std::move(name); return v; }
  static Value none() { Value v; v.kind = Kind::kNone; return v; }
  static Value boolean(bool x) { Value v; v.kind = Kind::kBool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::kInt; v.i = x; return v; }
  static Value real(double x) { Value v; v.kind = Kind::kFloat; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = Kind::kString; v.s = std::move(x); return v; }
  static Value make_list(List x = {}) { Value v; v.kind = Kind::kList; v.list = std::make_shared<List>(std::move(x)); return v; }
  static Value make_dict(Dict x = {}) { Value v; v.kind = Kind::kDict; v.dict = std::make_shared<Dict>(std::move(x)); return v; }
  static Value make_namespace(Dict x = {}) { Value v = make_dict(std::move(x)); v.kind = Kind::kNamespace; return v; }
  static Value function(std::string name, Function f) {
    Value v; v.kind = Kind::kFunction; v.s = std::move(name); v.fn = std::make_shared<Function>(std::move(f)); return v;
  }
  static Value from_json(const nlohmann::json& j);
  static Value from_json(const nlohmann::ordered_json& j);

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_none() const { return kind == Kind::kNone; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const { return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool; }
  bool is_mapping() const { return kind == Kind::kDict; }
  bool truthy() const;
  // Dict/namespace key lookup; nullptr when absent.
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value v);
};

const char* kind_name(Value::Kind k);
// str(x) as Python prints it ({{ x }}); undefined prints "".
std::string to_str(const Value& v);
// repr(x) as Python prints it (strings quoted, floats shortest round-trip).
std::string repr(const Value& v);
std::string float_repr(double x);
// json.dumps(x, ensure_ascii, indent, separators, sort_keys) with Python's exact spacing and escapes.
struct JsonOptions {
  bool ensure_ascii = false;
  int indent = -1;  // -1 = None
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false;
};
std::string to_json(const Value& v, const JsonOptions& opt);
bool equal(const Value& a, const Value& b);

// UTF-8 helpers: Python strings index by code point.
std::vector<char32_t> decode_utf8(const std::string& s);
std::string encode_utf8(const std::u32string_view& cps);
bool is_py_space(char32_t c);

struct CallArgs {
  List positional;
  std::vector<std::pair<std::string, Value>> keyword;
  // The keyword `name`, or positional `index`, or nullptr.
  const Value* get(size_t index, const std::string& name) const;
};

// ---- AST ----
struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
struct Expr {
  enum class Kind {
    kLiteral, kName, kList, kTuple, kDict, kGetAttr, kGetItem, kSlice, kCall, kFilter, kTest,
    kNeg, kPos, kNot, kAnd, kOr, kBinary, kCompare, kCond
  };
  Kind kind;
  int line = 0;
  Value literal;
  std::string name;                                   // variable, attribute, filter, test or operator
  std::vector<ExprPtr> args;                          // operands / positional arguments
  std::vector<std::pair<std::string, ExprPtr>> kwargs;  // keyword arguments; dict literal entries
  bool negated = false;                               // `is not`
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;
struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kCallMacro, kBreak, kContinue, kPassThrough };
  Kind kind;
  int line = 0;
  std::string text;                      // kText; macro name
  ExprPtr expr;                          // output / set value / for iterable / call
  ExprPtr filter;                        // `for ... if cond`
  std::vector<std::string> targets;      // for/set targets; "ns.attr" for namespace assignment
  std::vector<std::pair<ExprPtr, Body>> branches;  // if/elif
  Body body, else_body;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters with defaults (may be null)
};

struct Template {
  std::string name;
  Body body;
};

// Parses a template; syntax errors and unknown tags are rlaif::Error naming `name` and the line.
std::shared_ptr<const Template> parse(const std::string& source, const std::string& name);
// Renders with `vars` as the global context.
std::string render(const Template& tmpl, const std::map<std::string, Value>& vars);

}  // namespace rlaif::jinja
