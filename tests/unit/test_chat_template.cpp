// Jinja-subset interpreter: feature snippets (whitespace control, Python printing, operators, filters,
// tests, scoping, loops, macros) render exactly as jinja2 with transformers' environment renders them
// (tests/reference/chat_template_render.py snippets), and unsupported constructs are errors naming the
// construct and the template line.
#include <gtest/gtest.h>

#include "core/error.h"
#include "core/io.h"
#include "text/chat_template.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using ojson = nlohmann::ordered_json;

namespace {

struct Snippet {
  std::string tmpl;
  ojson vars = ojson::object();
};

const std::vector<Snippet>& snippets() {
  static const std::vector<Snippet> s = {
      {"  {% if 1 %}\n  a\n  {%+ if 1 %}b{% endif %}\n{# c #}\n  {#- d #}  x\n{%- endif %}  \n"},
      {"  {{ 'x' }}\n  {% if true %}\n y\n  {% endif %}\n\t{% for i in [1] %}\n{{ i }}\n{% endfor %}\n"},
      {"{%- for m in ms -%}\n  {{- m }}\n{%- endfor %}\nend\n\n", {{"ms", {"a", "b"}}}},
      {"a {# comment #} b\n{# multi\nline #}\nc\r\nd\n"},
      {"{{ 1.0 }} {{ 1e20 }} {{ 0.00001 }} {{ 1/3 }} {{ 2.5e-10 }} {{ 123456789.125 }} {{ none }} "
       "{{ [1,'a',none,true, 1.5] }} {{ {'a':1, 'b': \"it's\"} }} {{ true }}"},
      {"{{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1e15 }} {{ 0.0001 }} {{ -1.5e-7 }} {{ 100.0 / 3 }} {{ 2 ** -1 }} {{ x }} {{ y }}",
       {{"x", 3.0}, {"y", 1e-300}}},
      {"{{ 7//2 }} {{ -7//2 }} {{ -7%3 }} {{ 2**10 }} {{ 3/2 }} {{ 7.5//2 }} {{ 'ab'*3 }} {{ [1]+[2] }} {{ 1 + true }} "
       "{{ -3|abs }} {{ (-3)|abs }} {{ xs|length - 1 }}",
       {{"xs", {1, 2, 3}}}},
      {"{{ 'abc'[::-1] }}|{{ 'héllo'[1] }}|{{ 'a b  c'.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }}|"
       "{{ '  x \\n'.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ '\\nhi\\n'.lstrip('\\n') }}{{ 'hi\\n\\n'.rstrip() }}|"
       "{{ 'héllo wörld'.upper() }}|{{ 'hello wORLD'.title() }}|{{ 'hello'.capitalize() }}|{{ 'Hello'.startswith('He') }}"
       "{{ 'Hello'.endswith(('x','lo')) }}|{{ 'aaa'.replace('a','b',2) }}|{{ 'héllo'|length }}|{{ 'abc'[1:] }}"
       "{{ 'abcdef'[-2:] }}{{ 'abcdef'[1:5:2] }}{{ 'abcdef'[10:] }}|{{ 'a-b-c'.find('-') }}{{ 'héllo'.find('l') }}"
       "{{ '-'.join(['x','y']) }}{{ 'ab12'.isalnum() }}{{ '12'.isdigit() }}"},
      {"{{ [1,2,3][-1] }} {{ [1,2,3][5] }}|{{ [3,1,2]|sort }} {{ ['b','A','a']|sort }} {{ [1,2,3]|first }} "
       "{{ [1,2,3]|last }} {{ [1,2,3]|join(', ') }} {{ [1,2,3][::-1] }} {{ [1,2,3,4][1:3] }} {{ [1,2,3,4][::-2] }} "
       "{{ 2 in [1,2] }} {{ 'x' not in 'abc' }} {{ [1,2]|length }} {{ range(5)|list }} {{ range(1,10,3)|list }} "
       "{{ [1,2] == [1,2] }} {{ 1 == 1.0 }} {{ [1,2] < [1,3] }} {{ 'b' > 'a' }}"},
      {"{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k, v in d|items %}{{ k }}{{ v }}{% endfor %}|"
       "{{ d.get('a') }}{{ d.get('zz', 'def') }}{{ d.zz }}|{{ d|length }}|{{ 'a' in d }}|{% for k in d %}{{ k }}{% endfor %}|"
       "{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ d.keys()|list }}{{ d.values()|list }}|{{ d }}|{{ d['c'] }}",
       {{"d", {{"b", 2}, {"a", {1, {{"x", nullptr}}}}, {"c", "é"}}}}},
      {"{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}"
       "{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('a','b') }},{% else %}empty"
       "{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}|{% for x in xs if x != 2 %}{{ loop.index }}:{{ x }}"
       "{{ loop.last }} {% endfor %}|{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 3 %}{% break %}"
       "{% endif %}{{ x }}{% endfor %}|{% for c in 'hé' %}[{{ c }}]{% endfor %}|{% for x in undefined_var %}u{% endfor %}",
       {{"xs", {1, 2, 3, 4}}}},
      {"{% set ns = namespace(n=0, s='') %}{% set x = 1 %}{% for i in [1,2,3] %}{{ x }}{% if i == 2 %}[{{ y }}]{% endif %}"
       "{% set x = i * 10 %}{% set y = i %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{{ x }}{% endfor %}{{ x }} "
       "{{ ns.n }} {{ ns.s }}{% if true %}{% set z = 5 %}{% endif %}{{ z }}"},
      {"{{ x is defined }}{{ y is defined }}{{ none is none }}{{ 'a' is string }}{{ 1 is number }}{{ 1.5 is integer }}"
       "{{ {} is mapping }}{{ [] is iterable }}{{ y is iterable }}{{ 'a' is iterable }}{{ 3 is odd }}{{ 4 is divisibleby 2 }}"
       "{{ false is false }}{{ 0 is false }}{{ x is not none }}{{ 'abc' is lower }}{{ 'b' is in 'abc' }}"
       "{{ 2 is equalto 2 }}{{ true is sameas true }}{{ x is boolean }}{{ 1.0 is float }}{{ true is number }}",
       {{"x", 1}}},
      {"{{ y|default('d') }}{{ none|default('d') }}{{ ''|default('d', true) }}{{ x|d('no') }}|{{ '  t  '|trim }}|"
       "{{ 'Hi'|lower }}{{ 'Hi'|upper }}|{{ 'a-b'|replace('-', '+') }}|"
       "{{ xs|selectattr('k','equalto',1)|map(attribute='v')|list }}|{{ xs|rejectattr('k')|list }}|"
       "{{ [1,0,2]|select|list }}|{{ ['a','b']|map('upper')|join }}|{{ '3'|int + 1 }}{{ '2.5'|float }}{{ 'x'|int }}|"
       "{{ [1,2]|reverse|list }}|{{ 5|string ~ 'x' }}|{{ [1,1,2]|unique|list }}|{{ xs|first }}|{{ [1,2]|count }}|"
       "{{ 'a<b'|e }}{{ 'q'|safe }}|{{ xs|selectattr('k')|list|length }}|{{ [3,1]|sort(reverse=true) }}",
       {{"x", 0}, {"xs", {{{"k", 1}, {"v", "a"}}, {{"k", 0}, {"v", "b"}}}}}},
      {"{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} "
       "{{ greet('Al', punct='?') }} {{ greet(name='Cy') }}"},
      {"{{ 'y' if x else 'n' }}[{{ 'y' if x }}]{{ x and 'a' }}{{ x or 'b' }}{{ 0 or none }}{{ 1 < 2 < 3 }}"
       "{{ 3 > 2 > 2 }}{{ 'a' ~ 1 ~ none ~ y }}{{ not x }}{{ not (x or 1) }}", {{"x", 0}}},
      {"{% set body %}  hello {{ 1 + 1 }}\n{% endset %}[{{ body }}]{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = (1, 'x') %}{{ t[1] }}{{ t }}{{ (1,) }}{{ () }}{{ {'a': 1}.items()|list }}"},
      {"{{ 'a\\tb\\n\\u00e9\\x41\\\\' }}{{ \"it's\" }}{{ 'x' 'y' }}{{ 'q\\'q' }}"},
      {"{{ x|tojson(indent=4) }}|{{ x|tojson(separators=(',', ':')) }}|{{ x|tojson(sort_keys=true) }}|"
       "{{ x|tojson(ensure_ascii=true) }}|{{ [] |tojson(indent=2) }}{{ {}|tojson(indent=2) }}|{{ 'ctl\\x01\\x7f'|tojson }}",
       {{"x", {{"z", "é🚀"}, {"a", {1.0, -0.0, 1e100, true, nullptr, 12345678901234LL}}}}}},
      {"{% set d = {'a': {'b': [10, 20]}} %}{{ d.a.b[1] }}{{ d['a']['b'].0 }}{{ d.a.c }}{{ d['a'].c }}{{ none.x }}"},
      {"{{ ['it\\'s', 'say \"hi\"', 'both \\' \"', 'nl\\n', 'tab\\t', 'é'] }}"},
      {"{%- if messages[0]['role'] == 'system' -%}\n    {{- messages[0]['content'] + '\\n' }}\n{%- endif %}\n"
       "{%- for m in messages[1:] %}\n    <{{ m.role }}>{{ m.content | trim }}\n{%- endfor %}",
       {{"messages", {{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", " U "}}}}}},
      // Cases where jinja2 fails: we must fail too.
      {"{% set l = [] %}{{ l.append(1) }}"},
      {"{{ 'a' + 1 }}"},
      {"{{ y.z }}"},
      {"{{ 1 < 'a' }}"},
      {"{{ none|length }}"},
  };
  return s;
}

std::string render_snippet(const Snippet& s) {
  ChatTemplate t = ChatTemplate::from_string(s.tmpl, "snippet");
  ojson vars = s.vars;
  // render() always supplies messages/tools/add_generation_prompt; snippets that need none ignore them.
  ojson messages = vars.contains("messages") ? vars["messages"] : ojson::array();
  vars.erase("messages");
  return t.render(messages, false, nullptr, vars);
}

// Expects `fn` to throw rlaif::Error whose message contains every needle.
template <typename Fn>
void expect_error(Fn fn, std::vector<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning " << needles[0];
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << " lacks " << n;
  }
}

}  // namespace

TEST(ChatTemplate, SnippetsRenderLikeJinja2WithTransformersSettings) {
  const fs::path dir = test::temp_dir("chat_template_snippets");
  ojson in = ojson::array();
  for (const auto& s : snippets()) {
    ojson vars = s.vars;
    vars["add_generation_prompt"] = false;
    vars["tools"] = nullptr;
    vars["documents"] = nullptr;
    if (!vars.contains("messages")) vars["messages"] = ojson::array();
    in.push_back({{"template", s.tmpl}, {"vars", vars}});
  }
  write_file_atomic(dir / "in.json", in.dump());
  std::string log;
  ASSERT_EQ(test::run_command(fmt::format("{} {} snippets --in {} --out {}", test::python(),
                                          (test::source_dir() / "tests/reference/chat_template_render.py").string(),
                                          (dir / "in.json").string(), (dir / "out.json").string()),
                              &log),
            0)
      << log;
  const ojson want = ojson::parse(read_file(dir / "out.json"));
  ASSERT_EQ(want.size(), snippets().size());
  for (size_t k = 0; k < want.size(); ++k) {
    const std::string& tmpl = snippets()[k].tmpl;
    try {
      const std::string got = render_snippet(snippets()[k]);
      if (want[k].contains("error")) ADD_FAILURE() << "jinja2 failed (" << want[k]["error"] << ") but we rendered " << got << "\nfor " << tmpl;
      else EXPECT_EQ(got, want[k]["text"].get<std::string>()) << "template: " << tmpl;
    } catch (const Error& e) {
      if (!want[k].contains("error")) ADD_FAILURE() << "we failed: " << e.what() << "\nfor " << tmpl;
    }
  }
}

TEST(ChatTemplate, UnknownFilterNamesFilterAndLine) {
  expect_error([] { ChatTemplate::from_string("line one\n{{ 'x' | frobnicate }}", "t.jinja").render(ojson::array(), false); },
               {"unknown filter 'frobnicate'", "t.jinja:2"});
}

TEST(ChatTemplate, UnknownTestTagAndMethodAreErrors) {
  expect_error([] { ChatTemplate::from_string("{% if 1 is weird %}{% endif %}", "t").render(ojson::array(), false); },
               {"unknown test 'weird'", "t:1"});
  expect_error([] { ChatTemplate::from_string("a\nb\n{% include 'x.jinja' %}", "t"); }, {"tag 'include'", "t:3"});
  expect_error([] { ChatTemplate::from_string("{{ 'a {}'.format(1) }}", "t").render(ojson::array(), false); },
               {"str.format()"});
  expect_error([] { ChatTemplate::from_string("{% for x in xs recursive %}{% endfor %}", "t"); }, {"recursive"});
}

TEST(ChatTemplate, SyntaxErrorsNameTheLine) {
  expect_error([] { ChatTemplate::from_string("{% if x %}\nno end", "t"); }, {"endif"});
  expect_error([] { ChatTemplate::from_string("\n\n{{ 1 + }}", "t"); }, {"t:3"});
  expect_error([] { ChatTemplate::from_string("{{ 'open }}", "t"); }, {"unterminated string"});
  expect_error([] { ChatTemplate::from_string("{% endfor %}", "t"); }, {"endfor"});
}

TEST(ChatTemplate, RaiseExceptionMessageSurfaces) {
  ChatTemplate t = ChatTemplate::from_string(
      "{% for m in messages %}\n{% if m.role not in ['user', 'assistant'] %}\n"
      "{{ raise_exception('Unsupported role: ' ~ m.role) }}\n{% endif %}{% endfor %}",
      "strict");
  expect_error([&] { t.render(ojson::parse(R"([{"role":"robot","content":"x"}])"), false); },
               {"Unsupported role: robot", "strict:3"});
  EXPECT_EQ(t.render(ojson::parse(R"([{"role":"user","content":"x"}])"), false), "");
}

TEST(ChatTemplate, UndefinedAttributeOfUndefinedFails) {
  expect_error([] { ChatTemplate::from_string("{{ nope.attr }}", "t").render(ojson::array(), false); },
               {"'nope' is undefined"});
}

TEST(ChatTemplate, SpecialTokensAndExtraContext) {
  ChatTemplate t = ChatTemplate::from_string("{{ bos_token }}|{{ eos_token }}|{{ who }}|{{ tools is none }}");
  EXPECT_EQ(t.render(ojson::array(), false, nullptr, ojson{{"who", "me"}}), "||me|True");
  t.set_special_tokens("<s>", "</s>");
  EXPECT_EQ(t.render(ojson::array(), false, nullptr, ojson{{"who", "me"}}), "<s>|</s>|me|True");
}

TEST(ChatTemplate, StrftimeNowMatchesPython) {
  ChatTemplate t = ChatTemplate::from_string("{{ strftime_now('%Y') }}");
  std::string year;
  ASSERT_EQ(test::run_command(test::python() + " -c \"import datetime;print(datetime.datetime.now().strftime('%Y'),end='')\"", &year), 0);
  EXPECT_EQ(t.render(ojson::array(), false), year);
}

TEST(ChatTemplate, FromDirReadsTemplateListAndTokens) {
  const fs::path dir = test::temp_dir("chat_template_dir");
  write_file_atomic(dir / "tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "T"},
      {"name": "default", "template": "D{{ bos_token }}"}], "bos_token": {"content": "<b>", "lstrip": false}})");
  EXPECT_EQ(ChatTemplate::from_dir(dir).render(ojson::array(), false), "D<b>");
  write_file_atomic(dir / "chat_template.jinja", "J{{ bos_token }}\n");  // transformers prefers the file
  EXPECT_EQ(ChatTemplate::from_dir(dir).render(ojson::array(), false), "J<b>");
  expect_error([] { ChatTemplate::from_dir(test::temp_dir("chat_template_empty")); }, {"no chat template"});
}
