//! Wiki markup stripping on hand-written markup.

use ostquant_core::data::wiki::strip_markup;

#[test]
fn strips_templates_refs_links_and_tables() {
    let src = "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n\
'''Ada''' was a [[mathematician]] and [[Writer|writer]].<ref name=a>Source, p. 3</ref> She wrote [[Note G|notes]]<ref>x</ref>.\n\
[[File:Ada.jpg|thumb|A [[portrait]] of Ada]]\n\
{| class=\"wikitable\"\n|-\n| a || b\n|}\n\
== Early life ==\n\
* She was born in [[London]] &ndash; see [http://example.org the site].<!-- hidden -->\n\
== References ==\n\
{{reflist}}\n\
[[Category:Mathematicians]]\n[[fr:Ada Lovelace]]";
    let got = strip_markup(src);
    let want = "Ada was a mathematician and writer. She wrote notes.\n\
== Early life ==\n\
She was born in London – see the site.";
    assert_eq!(got, want);
}
