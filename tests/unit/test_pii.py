"""PII redaction: placeholders per entity, stable within a document, offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import spacy
import tldextract

from guard.pii import (
    PII_NER_PATH,
    REDACTED_ENTITIES,
    VECTORS_META_KEY,
    PiiRedactor,
    PlaceholderMap,
    _OfflineEmailRecognizer,
    get_redactor,
    load_ner_pipeline,
)
from guard.placeholders import NUMBERED


@pytest.fixture(scope="module")
def redactor() -> PiiRedactor:
    return get_redactor()


def _types(text: str) -> list[str]:
    """Return the entity types of the placeholders in a redacted text, in order."""
    return [match.group("type") for match in NUMBERED.finditer(text)]


def test_get_redactor_is_a_process_singleton() -> None:
    assert get_redactor() is get_redactor()


def test_spacy_runs_only_ner_and_the_cheap_lemma(redactor: PiiRedactor) -> None:
    nlp = redactor._analyzer.nlp_engine.get_nlp("en")
    assert nlp.meta["name"] == "govrag_pii_ner"
    assert nlp.pipe_names == ["ner", "govrag_lower_lemma"]


def test_the_ner_model_ships_inside_the_package() -> None:
    import guard

    assert PII_NER_PATH.is_relative_to(Path(guard.__file__).parent)
    assert spacy.load(PII_NER_PATH).pipe_names == ["ner"]
    assert not (PII_NER_PATH / "vocab" / "vectors").exists()  # the 40 MB of vectors stay in their package


def test_the_ner_gets_its_word_vectors_from_the_installed_package() -> None:
    nlp = load_ner_pipeline(PII_NER_PATH)
    assert nlp.vocab.vectors.shape == (20000, 300)
    doc = nlp("Please forward the invoice to Margaret Okonkwo before Friday.")
    assert [e.text for e in doc.ents if e.label_ == "PERSON"] == ["Margaret Okonkwo"]


def test_a_missing_vectors_package_is_a_clear_error(tmp_path: Path) -> None:
    shutil.copytree(PII_NER_PATH, tmp_path / "ner")
    meta = json.loads((tmp_path / "ner" / "meta.json").read_text(encoding="utf-8"))
    meta[VECTORS_META_KEY] = "no_such_vectors_package"
    (tmp_path / "ner" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(RuntimeError, match="make install"):
        load_ner_pipeline(tmp_path / "ner")


@pytest.mark.parametrize(
    ("text", "value", "entity"),
    [
        ("Write to maria.gonzalez@example.com for details.", "maria.gonzalez@example.com", "EMAIL_ADDRESS"),
        ("Call the office on (212) 555-0142 tomorrow.", "(212) 555-0142", "PHONE_NUMBER"),
        ("The card 4111 1111 1111 1111 was declined.", "4111 1111 1111 1111", "CREDIT_CARD"),
        ("Mastercard 2223 0031 2200 3222 is on file.", "2223 0031 2200 3222", "CREDIT_CARD"),
        ("Her social security number is 536-22-8741.", "536-22-8741", "US_SSN"),
        ("Pay to IBAN GB82 WEST 1234 5698 7654 32 today.", "GB82 WEST 1234 5698 7654 32", "IBAN_CODE"),
        ("The server at 192.168.14.27 rebooted.", "192.168.14.27", "IP_ADDRESS"),
        ("Send 0.1 BTC to 1BoatSLRHtKNngkdXEeobR76b53LETtpyT please.", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT", "CRYPTO"),
        ("Maria Gonzalez approved the budget.", "Maria Gonzalez", "PERSON"),
        ("Use key AKIAIOSFODNN7EXAMPLE for the bucket.", "AKIAIOSFODNN7EXAMPLE", "SECRET"),
        ("ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 is the token.", "ghp_a1B2c3D4", "SECRET"),
        ("config: password = 'Tr0ub4dor&3xyz'", "Tr0ub4dor&3xyz", "SECRET"),
    ],
)
def test_each_entity_type_is_replaced(redactor: PiiRedactor, text: str, value: str, entity: str) -> None:
    redacted = redactor.redact(text)
    assert value not in redacted
    assert f"<{entity}_1>" in redacted


def test_context_words_lift_weak_patterns(redactor: PiiRedactor) -> None:
    redacted = redactor.redact("Passport number 912803456 and bank account number 123456789012.")
    assert "912803456" not in redacted
    assert "123456789012" not in redacted
    assert set(_types(redacted)) >= {"US_PASSPORT", "US_BANK_NUMBER"}


@pytest.mark.parametrize(("text", "redacted"), [
    ("Paid with 4111.1111.1111.1111 yesterday.", "Paid with <CREDIT_CARD_1> yesterday."),
    ("Card 5105.1051.0510.5100", "Card <CREDIT_CARD_1>"),
    ("Amex 3782.822463.10005 on file.", "Amex <CREDIT_CARD_1> on file."),
])
def test_a_dotted_card_number_is_a_card(redactor: PiiRedactor, text: str, redacted: str) -> None:
    """Cards in dotted groups matched no card pattern (dashes and spaces only) and were left whole, or, in a title,
    read as a 12-digit phone with the last group left shown."""
    assert redactor.redact(text) == redacted


def test_card_shaped_numbers_failing_luhn_are_kept(redactor: PiiRedactor) -> None:
    text = "Order reference 2223 0031 2200 3223 shipped."
    assert redactor.redact(text) == text


def test_presidio_rejects_well_known_invalid_ssns(redactor: PiiRedactor) -> None:
    redacted = redactor.redact("The sample SSN 078-05-1120 from a wallet insert.")
    assert "<US_SSN_" not in redacted


def test_same_person_gets_the_same_placeholder(redactor: PiiRedactor) -> None:
    text = "Maria Gonzalez signed the contract. Later, Maria Gonzalez called the supplier."
    redacted = redactor.redact(text)
    assert "Maria" not in redacted
    assert redacted.count("<PERSON_1>") == 2
    assert "<PERSON_2>" not in redacted


def test_different_people_get_different_placeholders(redactor: PiiRedactor) -> None:
    redacted = redactor.redact("Maria Gonzalez met John Smith in Chicago.")
    assert "<PERSON_1>" in redacted
    assert "<PERSON_2>" in redacted
    assert redacted.index("<PERSON_1>") < redacted.index("<PERSON_2>")


def test_placeholders_are_stable_across_chunks_of_one_document(redactor: PiiRedactor) -> None:
    placeholders = PlaceholderMap()
    chunks = [
        "Maria Gonzalez wrote from maria.gonzalez@example.com.",
        "John Smith replied to Maria Gonzalez.",
        "Reach maria.gonzalez@example.com or call (212) 555-0142.",
    ]
    first, second, third = redactor.redact_many(chunks, placeholders)
    assert first == "<PERSON_1> wrote from <EMAIL_ADDRESS_1>."
    assert second == "<PERSON_2> replied to <PERSON_1>."
    assert third == "Reach <EMAIL_ADDRESS_1> or call <PHONE_NUMBER_1>."
    assert placeholders.counts() == {"PERSON": 2, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}


def test_separate_documents_start_their_own_numbering(redactor: PiiRedactor) -> None:
    one = redactor.redact("John Smith called.", PlaceholderMap())
    other = redactor.redact("Maria Gonzalez called.", PlaceholderMap())
    assert one == other == "<PERSON_1> called."


def test_redact_many_matches_redact(redactor: PiiRedactor) -> None:
    texts = ["Call (212) 555-0142 now.", "", "Email a.b@example.org.", "Nothing here at all."]
    batched = redactor.redact_many(texts, PlaceholderMap())
    single = [redactor.redact(text, PlaceholderMap()) for text in texts]
    assert batched == single
    assert redactor.redact_many([], PlaceholderMap()) == []


@pytest.mark.parametrize(("value", "entity"), [("4111 1111 1111 1111", "CREDIT_CARD"),
                                               ("+44 20 7946 0958", "PHONE_NUMBER"),
                                               ("GB82 WEST 1234 5698 7654 32", "IBAN_CODE")])
def test_a_value_a_chunk_boundary_cuts_in_two_is_redacted_in_both_chunks(redactor: PiiRedactor, value: str,
                                                                         entity: str) -> None:
    """A table row too wide for one chunk is cut between words: each chunk was redacted alone, and neither piece of
    the number was recognised, so both were stored and embedded raw (12 of a card's 16 digits)."""
    from ingestion.chunk import chunk_sections
    from ingestion.parse import Section

    row = "x" * 990 + f" {value} | paid in full | " + "notes " * 10
    chunks = [c.text for c in chunk_sections([Section(text=row, kind="table", page=None, heading=None)], 1000)]
    assert len(chunks) == 2 and value not in chunks[0] and value not in chunks[1]  # the boundary cuts it
    placeholders = PlaceholderMap()
    first, second = redactor.redact_many(chunks, placeholders)
    assert first.endswith(f" <{entity}_1>") and second.startswith(f"<{entity}_1> | paid in full")
    assert placeholders.mapping() == {f"<{entity}_1>": value}


def test_a_cut_value_seen_whole_elsewhere_keeps_its_one_placeholder(redactor: PiiRedactor) -> None:
    """The pieces take the placeholder the whole value has in another chunk, the map holds the value once, and a
    chunk that is all piece (its start and end both the cut's) is all placeholder."""
    placeholders = PlaceholderMap()
    texts = ["Card 4111 1111 1111 1111 on file.", "Charged to 4111 1111", "1111 1111", "Thank you."]
    assert redactor.redact_many(texts, placeholders) == [
        "Card <CREDIT_CARD_1> on file.", "Charged to <CREDIT_CARD_1>", "<CREDIT_CARD_1>", "Thank you."]
    assert placeholders.mapping() == {"<CREDIT_CARD_1>": "4111 1111 1111 1111"}


def test_formatting_variants_of_a_number_share_a_placeholder(redactor: PiiRedactor) -> None:
    redacted = redactor.redact("Cards 4111 1111 1111 1111 and 4111-1111-1111-1111 are the same.")
    assert redacted.count("<CREDIT_CARD_1>") == 2


def test_benign_text_is_unchanged(redactor: PiiRedactor) -> None:
    texts = [
        "The Quarterly Report covers Revenue Growth and Operating Costs for the Finance Team.",
        "Submit Expense Claims through the Travel Portal before Friday.",
        "Our office in Paris opens on 3 May 2024 at 9:00.",
        "Section 4.2 of the Security Policy applies to all Contractors.",
        "Version 2.1.0 was released; see Table 3 and Figure 7.",
    ]
    assert redactor.redact_many(texts, PlaceholderMap()) == texts


def test_locations_and_dates_are_not_redacted(redactor: PiiRedactor) -> None:
    text = "Maria Gonzalez flew from Madrid to New York on 12 March 2023."
    redacted = redactor.redact(text)
    assert redacted == "<PERSON_1> flew from Madrid to New York on 12 March 2023."


@pytest.mark.parametrize("text", [
    "Berkshire Hathaway is a design agency based in Pelhrimov.",
    "The orchestra now tours Southern Tunisia every summer.",
    "Tomomi is from Hawkins, Richardson and Santana",
    "I am in Akureyri for a business trip.",
])
def test_places_and_companies_are_not_redacted_as_people(redactor: PiiRedactor, text: str) -> None:
    redacted = redactor.redact(text)
    assert redacted.count("<PERSON_") <= (1 if text.startswith("Tomomi") else 0)


@pytest.mark.parametrize("title", ["Mrs.", "Dr.", "Miss"])
def test_courtesy_titles_stay_outside_the_name(redactor: PiiRedactor, title: str) -> None:
    redacted = redactor.redact(f"For my take on {title} Baker, see the review.")
    assert redacted == f"For my take on {title} <PERSON_1>, see the review."


def test_overlaps_keep_the_stronger_result(redactor: PiiRedactor) -> None:
    redacted = redactor.redact("Contact maria.gonzalez@example.com now.")
    assert _types(redacted) == ["EMAIL_ADDRESS"]


def test_placeholder_map_never_shows_values() -> None:
    placeholders = PlaceholderMap()
    assert placeholders.placeholder_for("PERSON", "Maria  Gonzalez") == "<PERSON_1>"
    assert placeholders.placeholder_for("PERSON", "maria gonzalez") == "<PERSON_1>"
    assert placeholders.placeholder_for("PERSON", "John Smith") == "<PERSON_2>"
    assert placeholders.placeholder_for("EMAIL_ADDRESS", "John Smith") == "<EMAIL_ADDRESS_1>"
    assert "Maria" not in repr(placeholders)
    assert "Smith" not in str(placeholders)
    assert len(placeholders) == 3


def test_email_validation_uses_the_bundled_suffix_list(redactor: PiiRedactor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suffix list is loaded again here, whatever ran before, and from the snapshot in tldextract's wheel: no URL
    is fetched. (Patching `find_first_response`, which tldextract calls with no URLs before it falls back to the
    snapshot, failed this test whenever it loaded the list first, as when run alone.)"""
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("tldextract tried to reach the network")

    monkeypatch.setattr(tldextract.cache.DiskCache, "cached_fetch_url", no_network)
    monkeypatch.setattr(tldextract, "extract", no_network)
    monkeypatch.setattr(_OfflineEmailRecognizer._extractor, "_extractor", None)  # forget a list loaded earlier
    redacted = redactor.redact("Mail jane.doe@example.co.uk but not jane@localhost or a@b.invalidtld.")
    assert "<EMAIL_ADDRESS_1>" in redacted
    assert "jane.doe@example.co.uk" not in redacted
    assert "jane@localhost" in redacted
    assert "a@b.invalidtld" in redacted


@pytest.mark.parametrize("address", ["anna.berg@ops.acme.internal", "piotr.nowak@corp.local", "it-desk@acme.corp",
                                     "Jan.Horak@HR.LAN"])
def test_an_address_under_a_private_use_name_is_redacted_too(redactor: PiiRedactor, address: str) -> None:
    """Mail kept inside an organisation (`.internal`, `.local`, `.corp`...) has no public suffix: it reached the
    index, answers, snippets and titles as it was."""
    redacted = redactor.redact(f"Complaints go to {address}. Thanks.")
    assert address not in redacted and "<EMAIL_ADDRESS_1>" in redacted
    assert redactor.redact_title(f"Mail {address}.txt") == "Mail <EMAIL_ADDRESS>.txt"


def test_only_the_configured_entities_are_produced(redactor: PiiRedactor) -> None:
    text = (
        "Maria Gonzalez (maria@example.com, (212) 555-0142) lives in Boston, works at Acme Corp "
        "since 2019, card 4111 1111 1111 1111."
    )
    found = {result.entity_type for result in redactor.analyze(text)}
    assert found <= set(REDACTED_ENTITIES)
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD"} <= found


def test_phone_windows_find_what_the_whole_text_scan_finds() -> None:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    from guard import pii_rules

    text = (
        "Team 12 meets on day 5 of 2024. Call +44 20 7946 0123 or (212) 555-0142 ext. 7 tomorrow; "
        + "filler words without digits " * 20
        + "desk 030 1234 5678, fax 212.555.0199x12, order 1234567."
    )
    windowed = pii_rules._PlausiblePhoneRecognizer().analyze(text, ["PHONE_NUMBER"])
    whole = [r for r in PhoneRecognizer().analyze(text, ["PHONE_NUMBER"])
             if pii_rules._phone_shaped(text[r.start : r.end]) and pii_rules._plausible_loose_phone(text, r)]
    assert sorted((r.start, r.end) for r in windowed) == sorted((r.start, r.end) for r in whole)
    assert len(windowed) >= 3


def test_number_recognizers_are_skipped_on_text_without_digits() -> None:
    from guard.pii import _possible_entities

    assert "CREDIT_CARD" not in _possible_entities("What is the travel policy?")
    assert "EMAIL_ADDRESS" not in _possible_entities("What is the travel policy?")
    assert {"CREDIT_CARD", "PHONE_NUMBER", "EMAIL_ADDRESS"} <= set(_possible_entities("card 4111 for a@b.io"))
    assert "PERSON" in _possible_entities("no digits here")


def test_fast_token_lookup_matches_presidio() -> None:
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    from guard.pii import _FastContextEnhancer

    doc = spacy.blank("en")("  Call me on 555-0142,  please ( now ).")
    offsets = [token.idx for token in doc]
    for start in range(len(doc.text)):
        try:
            expected = LemmaContextAwareEnhancer._find_index_of_match_token("", start, doc, offsets)
        except ValueError:
            with pytest.raises(ValueError):
                _FastContextEnhancer._find_index_of_match_token("", start, doc, offsets)
            continue
        assert _FastContextEnhancer._find_index_of_match_token("", start, doc, offsets) == expected


def test_e_mail_header_names_are_kept_and_the_people_in_them_redacted(redactor: PiiRedactor) -> None:
    header = ("From: Theodora Blackwood <theo@example.org>\nTo: Marcus Lee <marcus@example.org>\n"
              "Cc: Priya Shah\nSubject: Budget review\n\nHi Marcus, the budget is attached.")

    redacted = redactor.redact(header)

    assert redacted.startswith(
        "From: <PERSON_1> <<EMAIL_ADDRESS_1>>\nTo: <PERSON_2> <<EMAIL_ADDRESS_2>>\nCc: <PERSON_3>")
    assert not any(name in redacted for name in ("Theodora", "Blackwood", "Marcus", "Priya", "Shah"))


@pytest.mark.parametrize(("title", "redacted"), [
    ("Jordan Office Lease.pdf", "Jordan Office Lease.pdf"),  # the NER took "Lease.pdf" for a name
    ("Payslip March.pdf", "Payslip March.pdf"),  # ... and the whole title, extension included
    ("Memo for Dr Hallgerður P.pdf", "Memo for Dr <PERSON>.pdf"),  # the context patterns took in the dot
    ("Sarah Connor performance review.docx", "<PERSON> performance review.docx"),
    ("maria.gonzalez@example.com.txt", "<EMAIL_ADDRESS>.txt"),  # the extension hid the domain
])
def test_a_title_is_redacted_up_to_its_file_extension(redactor: PiiRedactor, title: str, redacted: str) -> None:
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("Minutes 2024.05.17.pdf", "Minutes 2024.05.17.pdf"),  # a date was a <PHONE_NUMBER>
    ("Minutes 17.05.2024.docx", "Minutes 17.05.2024.docx"),
    ("Report 2024.05.17", "Report 2024.05.17"),
    ("Statement 4111.1111.1111.1111", "Statement <CREDIT_CARD>"),  # read as `<PHONE_NUMBER>.1111`
    ("Statement 4111.1111.1111.1111.pdf", "Statement <CREDIT_CARD>.pdf"),
    ("Statement 4111.1111.1111.1111.001", "Statement <CREDIT_CARD>.001"),  # a split archive's part
    ("Call 020.7946.0958.pdf", "Call <PHONE_NUMBER>.pdf"),
    ("Minutes 2024.05.17.tar.gz", "Minutes 2024.05.17.tar.gz"),  # a compound extension splits no dotted number
    ("Minutes 17.05.2024.docx.enc", "Minutes 17.05.2024.docx.enc"),
    ("release v1.2.3.tar.gz", "release v1.2.3.tar.gz"),
    ("Statement 4111.1111.1111.1111.pdf.gpg", "Statement <CREDIT_CARD>.pdf.gpg"),
    ("Call 020.7946.0958.pdf.gpg", "Call <PHONE_NUMBER>.pdf.gpg"),
])
def test_dates_and_dotted_numbers_in_a_title(redactor: PiiRedactor, title: str, redacted: str) -> None:
    """A date ending a title was a <PHONE_NUMBER>, and a dotted card, no card to any pattern, was read as a phone cut
    short by the reading without its "extension" `.1111`, its last group left shown."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("Claim of maria.gonzalez@example.com", "Claim of <EMAIL_ADDRESS>"),
    ("Claim of maria.gonzalez@example.com.txt", "Claim of <EMAIL_ADDRESS>.txt"),
    ("Mail name@corp.co.uk", "Mail <EMAIL_ADDRESS>"),  # the stem's `name@corp.co` left `.uk` behind
    ("Mail name@corp.co.uk.pdf", "Mail <EMAIL_ADDRESS>.pdf"),
    ("Claim of maria.gonzalez@example.com.001", "Claim of <EMAIL_ADDRESS>.001"),  # digits alone are an extension too
    ("Claim of maria.gonzalez@example.com.2", "Claim of <EMAIL_ADDRESS>.2"),
    ("Escalations anna.berg@ops.acme.internal", "Escalations <EMAIL_ADDRESS>"),
    ("Router 192.168.0.1", "Router <IP_ADDRESS>"),
    ("Router 192.168.0.1.log", "Router <IP_ADDRESS>.log"),
    ("Backup 192.168.0.1.tar.gz.001", "Backup <IP_ADDRESS>.tar.gz.001"),
    ("+44 20 7946 0958.pdf.gpg", "<PHONE_NUMBER>.pdf.gpg"),
    ("Notes from Maria.Gonzalez", "Notes from <PERSON>.<PERSON>"),  # a name after the dot is no extension's
])
def test_a_value_ending_a_title_is_redacted_whole_though_its_end_looks_like_a_file_extension(
        redactor: PiiRedactor, title: str, redacted: str) -> None:
    """`.com`, `.1`, `.internal` read as an extension, and a value reaching into it was dropped: a title ending in an
    address was shown as it was (in citations and the listing)."""
    assert redactor.redact_title(title) == redacted


def test_a_title_is_read_without_each_extension_of_a_compound_one_up_to_eight() -> None:
    """Only the last extension was taken off: `maria@example.com.tar.gz` was read as `maria@example.com.tar`, no
    address. An extension before the last holds a letter, so a dotted number is no chain of them. Three were read at
    most, so a fourth hid the address again (`maria@example.com.backup.old.tar.gz`); a chain is read to its start now,
    up to eight extensions."""
    from guard.pii import title_readings

    assert title_readings("maria@example.com.tar.gz") == [
        "maria@example.com.tar.gz", "maria@example.com.tar", "maria@example.com", "maria@example"]
    assert title_readings("maria@example.com.backup.old.tar.gz")[-2:] == ["maria@example.com", "maria@example"]
    assert title_readings("a.b.c.d.e") == ["a.b.c.d.e", "a.b.c.d", "a.b.c", "a.b", "a"]
    assert title_readings("a" + ".b" * 10)[-1] == "a.b.b"  # the title and eight extensions off, no more
    assert title_readings("Minutes 2024.05.17.tar.gz") == [
        "Minutes 2024.05.17.tar.gz", "Minutes 2024.05.17.tar", "Minutes 2024.05.17"]
    assert title_readings("Statement 4111.1111.1111.1111.001") == [
        "Statement 4111.1111.1111.1111.001", "Statement 4111.1111.1111.1111"]
    assert title_readings("Quarterly budget") == ["Quarterly budget"]
    assert title_readings("Jan.Horak.pdf") == ["Jan.Horak.pdf", "Jan.Horak"]  # a capitalised word is no extension
    assert title_readings("maria@Example.COM.TAR.GZ") == [
        "maria@Example.COM.TAR.GZ", "maria@Example.COM.TAR", "maria@Example.COM", "maria@Example"]
    assert title_readings("Jan.Horak.Docx.Enc") == [  # a known extension is one in any case
        "Jan.Horak.Docx.Enc", "Jan.Horak.Docx", "Jan.Horak"]
    assert title_readings("Dr.Smith.Report.Pdf.Gpg") == [
        "Dr.Smith.Report.Pdf.Gpg", "Dr.Smith.Report.Pdf", "Dr.Smith.Report"]


@pytest.mark.parametrize(("title", "redacted"), [
    ("maria@example.com.tar.gz", "<EMAIL_ADDRESS>.tar.gz"),
    ("Claim of maria.gonzalez@example.com.pdf.gpg", "Claim of <EMAIL_ADDRESS>.pdf.gpg"),
    ("Mail name@corp.co.uk.tar.gz", "Mail <EMAIL_ADDRESS>.tar.gz"),
    ("Escalations anna.berg@ops.acme.internal.tar.gz", "Escalations <EMAIL_ADDRESS>.tar.gz"),
    ("Mail maria@example.com.backup.tar.gz", "Mail <EMAIL_ADDRESS>.backup.tar.gz"),  # three deep
    ("Letter to Peter Novak.docx.enc", "Letter to <PERSON>.docx.enc"),  # `Novak` was shown
    ("Meeting notes Brian.docx.enc", "Meeting notes <PERSON>.docx.enc"),
    ("Report by Maria Gonzalez.final.pdf", "Report by <PERSON>.final.pdf"),
])
def test_a_value_before_a_compound_file_extension_is_redacted_and_the_extension_kept(
        redactor: PiiRedactor, title: str, redacted: str) -> None:
    """Read without its last extension alone, a title ending in `.tar.gz`, `.pdf.gpg` hid an address's domain (and
    the NER cut a name at the inner extension): the value was stored and shown as it was."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("Jordan Office Lease.pdf.gpg", "Jordan Office Lease.pdf.gpg"),  # was `Jordan Office <PERSON>.gpg`
    ("Payslip March.pdf.gpg", "Payslip March.pdf.gpg"),  # was `<PERSON>.gpg`
    ("Holiday rota June.docx.enc", "Holiday rota June.docx.enc"),
    ("Travel request Lisbon.pdf.gpg", "Travel request Lisbon.pdf.gpg"),
    ("Memo for Dr Hallgerður P.pdf.gpg", "Memo for Dr <PERSON>.pdf.gpg"),  # was `<PERSON>pdf.gpg`, its dot taken
])
def test_a_name_never_takes_in_a_compound_file_extension(redactor: PiiRedactor, title: str, redacted: str) -> None:
    """A name crossing into the inner extension (the NER's `Lease.pdf` in `Lease.pdf.gpg`) was kept, as only the last
    one was read as an extension: the title lost its words and its extension to `<PERSON>`."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("Jan.Horak.pdf", "<PERSON>.pdf"),  # was `<PERSON>.Horak.pdf`: main had `<PERSON>.pdf`
    ("Letter to Jan.Horak.pdf.gpg", "Letter to <PERSON>.pdf.gpg"),
    ("CV Jan.Horak.v2.docx", "<PERSON>.v2.docx"),
    ("Sales.Deck.Final.pptx", "Sales.Deck.Final.pptx"),  # was `Sales.<PERSON>.Final.pptx`
])
def test_a_capitalised_word_before_an_extension_is_no_extension_of_a_compound_one(
        redactor: PiiRedactor, title: str, redacted: str) -> None:
    """Any short word after a dot was read as an inner extension: `Jan.Horak.pdf` was read as `Jan` too, the name
    the NER finds whole in `Jan.Horak` crossed that apparent extension's start and was dropped, and `Horak` was shown
    (a leak main did not have); `Sales.Deck.Final` read as `Sales.Deck` gave the NER a word out of its context. An
    inner extension is in one case (`.tar`, `.PDF`), as file extensions are, and a capitalised word is none."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("maria@example.com.backup.old.tar.gz", "<EMAIL_ADDRESS>.backup.old.tar.gz"),
    ("Claim of maria.gonzalez@example.com.backup.old.tar.gz.001", "Claim of <EMAIL_ADDRESS>.backup.old.tar.gz.001"),
    ("Jan Horak.docx.bak.old.enc", "<PERSON>.docx.bak.old.enc"),  # was `<PERSON> Horak.docx.bak.old.enc`
    ("Letter to Peter Novak.backup.old.tar.gz.001", "Letter to <PERSON>.backup.old.tar.gz.001"),
    ("Letter to Maria.Gonzalez.v2.old.tar.gz", "Letter to <PERSON>.<PERSON>.v2.old.tar.gz"),  # `.Gonzalez` shown
])
def test_a_value_behind_four_or_more_extensions_is_redacted(redactor: PiiRedactor, title: str, redacted: str) -> None:
    """A chain was read three extensions deep: behind a fourth the address's domain was hidden again (stored as given)
    and the NER, reading the name glued to the inner extensions, cut it (its surname shown)."""
    assert redactor.redact_title(title) == redacted


@pytest.fixture
def ner_runs(redactor: PiiRedactor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the NER is run on (the NLP engine's `process_text`; the value recognizers alone need none), each
    added as the redactor runs it."""
    engine = redactor._analyzer.nlp_engine
    runs: list[str] = []
    process_text = engine.process_text

    def counted(text: str, language: str) -> object:
        runs.append(text)
        return process_text(text, language)

    monkeypatch.setattr(engine, "process_text", counted)
    return runs


def test_the_ner_reads_a_title_twice_whatever_its_chain(redactor: PiiRedactor, ner_runs: list[str]) -> None:
    """Every reading of a title ran the NER (~5 ms each), four for a chain of three; reading a chain to its start
    would cost one more run an extension. The NER reads the title as it is and without its whole chain; the readings
    between are read by the value recognizers alone, which still find the address they hide."""
    title = "Mail maria@example.com.backup.old.tar.gz.001"
    assert redactor.redact_title(title) == "Mail <EMAIL_ADDRESS>.backup.old.tar.gz.001"
    assert ner_runs == [title, "Mail maria@example"]
    ner_runs.clear()
    assert redactor.redact_title("Quarterly budget") == "Quarterly budget"
    assert ner_runs == ["Quarterly budget"]


def test_a_stored_title_read_again_before_its_compound_extension_runs_the_ner_on_its_stem_alone(
        redactor: PiiRedactor, ner_runs: list[str]) -> None:
    """Migration 0025 reads a stored title again in the readings the rule before did not read (`readings[2:]`), as a
    title set now is read: the NER its stem alone, whatever the chain's depth (one run, not one a reading: 17 ms a
    title with all of them), the value recognizers each reading, which find the address three extensions hide and,
    in one case alone before, a capitalised chain's. A title without a chain is not read at all."""
    stored = "Mail maria@example.com.backup.old.tar.gz.001"
    assert redactor.redact_title_before_compound_extension(stored) == "Mail <EMAIL_ADDRESS>.backup.old.tar.gz.001"
    assert ner_runs == ["Mail maria@example"]
    ner_runs.clear()
    assert redactor.redact_title_before_compound_extension("<PERSON> Horak.Docx.Enc") == "<PERSON> <PERSON>.Docx.Enc"
    assert ner_runs == ["<PERSON> Horak"]
    ner_runs.clear()
    assert redactor.redact_title_before_compound_extension("Letter to <PERSON> Novak.docx") == \
        "Letter to <PERSON> Novak.docx"
    assert ner_runs == []


@pytest.mark.parametrize(("title", "redacted"), [
    ("Claim of maria@example.com.Pdf.Gpg", "Claim of <EMAIL_ADDRESS>.Pdf.Gpg"),  # stored as given
    ("Mail anna.berg@ops.acme.internal.Tar.Gz", "Mail <EMAIL_ADDRESS>.Tar.Gz"),
    ("Notes for maria.gonzalez@example.com.Docx.Bak.Old.Enc", "Notes for <EMAIL_ADDRESS>.Docx.Bak.Old.Enc"),
    ("Jan Horak.Docx.Enc", "<PERSON>.Docx.Enc"),  # was `<PERSON>.<PERSON>.<PERSON>`: `Docx`, `Enc` taken for names
    ("Jordan Office Lease.Pdf.Gpg", "Jordan Office Lease.Pdf.Gpg"),  # was `Jordan Office Lease.<PERSON>.<PERSON>`
    ("Meeting.Notes.Pdf", "Meeting.Notes.Pdf"),  # was `Meeting.Notes.<PERSON>`
])
def test_a_value_before_a_capitalised_compound_extension_is_redacted_and_the_extension_kept(
        redactor: PiiRedactor, title: str, redacted: str) -> None:
    """An inner extension was one only in one case, so `.Pdf.Gpg` was read as `.Gpg` alone and the address's domain
    ran into `.Pdf` (stored as given); and the NER took a capitalised extension for a name (`<PERSON>.<PERSON>`). A
    known file extension is one in any case, and a name that is extensions of the chain alone is none."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("title", "redacted"), [
    ("Jan.Horak.pdf", "<PERSON>.pdf"),
    ("Jan.Horak.Final.pdf", "<PERSON>.Final.pdf"),
    ("Dr.Smith.Report.pdf", "<PERSON>.Report.pdf"),
    ("Notes from Maria.Gonzalez", "Notes from <PERSON>.<PERSON>"),
    ("Sales.Deck.Final.pptx", "Sales.Deck.Final.pptx"),
    ("CV Jan.Horak.v2.docx", "<PERSON>.v2.docx"),
    ("Victoria.Station.map.pdf", "<PERSON>.Station.map.pdf"),
    ("Maria.Gonzalez.Doc.pdf", "<PERSON>.<PERSON>.Doc.pdf"),  # `Doc` a known extension, no longer a name
])
def test_a_capitalised_word_that_is_no_known_extension_still_ends_a_chain(
        redactor: PiiRedactor, title: str, redacted: str) -> None:
    """Guards: a capitalised word is an inner extension only when it is a known one, so a dotted name before an
    extension (`Jan.Horak.pdf`) is read as main read it: redacted whole, the surname never cut off."""
    assert redactor.redact_title(title) == redacted


@pytest.mark.parametrize(("entity", "pattern", "title", "redacted"), [
    ("PERSON", r"\b[a-z]+\.[a-z]+\b", "Access for maria.gonzalez", "Access for <PERSON>"),
    ("EMPLOYEE_ID", r"\bE-\d{4}\.\d{2}\b", "Payroll E-1234.56", "Payroll <EMPLOYEE_ID>"),
])
def test_a_department_value_ending_a_title_is_redacted_whole_whatever_its_type(
        redactor: PiiRedactor, entity: str, pattern: str, title: str, redacted: str) -> None:
    """A department's recognizer is a pattern, whatever type it names: `.gonzalez` and `.56` read as an extension, and
    its value reaching into it was dropped as the NER's `Lease.pdf` is (a PERSON handle, and before, any value)."""
    from guard.pii_rules import CustomRecognizer, RedactionRules

    rules = RedactionRules(recognizers=(CustomRecognizer(entity=entity, pattern=pattern),))
    assert redactor.redact_title(title, rules) == redacted
    assert redactor.redact_title(title, rules, rules_only=True) == redacted


def test_a_header_name_spacy_tags_as_a_person_is_kept_too(redactor: PiiRedactor) -> None:
    """spaCy's NER (not only the context patterns) tags `Bcc` PERSON: the Bcc line read `<PERSON_3>: <PERSON_4>`."""
    header = ("From: Maria Gonzalez <maria.gonzalez@example.com>\nTo: Peter Novak <peter.novak@example.com>\n"
              "Bcc: Jan Horak <jan.horak@example.com>\nSubject: Budget\n\nThe Oslo budget is 300 EUR.")

    redacted = redactor.redact(header)

    assert "\nBcc: <PERSON_" in redacted, redacted
    assert not any(name in redacted for name in ("Gonzalez", "Novak", "Horak"))


def test_a_department_rule_applied_again_to_a_redacted_title_changes_only_its_values(redactor: PiiRedactor) -> None:
    """Re-running every recognizer on a stored (redacted) title took a word beside a placeholder for a name; a run
    applies the department's own recognizers alone to it."""
    from guard.pii_rules import CustomRecognizer, RedactionRules

    rules = RedactionRules(recognizers=(CustomRecognizer(entity="PROJECT_CODE", pattern=r"\bPRJ-\d{6}\b"),))
    stored = "payslips.eml / Payslip <PERSON> SSN <US_SSN> PRJ-482913.txt"
    assert redactor.redact_title(stored, rules, rules_only=True) == \
        "payslips.eml / Payslip <PERSON> SSN <US_SSN> <PROJECT_CODE>.txt"
    assert redactor.redact_title(stored, RedactionRules(), rules_only=True) == stored


@pytest.mark.parametrize(("stored", "redacted"), [
    ("Minutes <PERSON> Board.tar.gz", "Minutes <PERSON> Board.tar.gz"),  # was `<PERSON> <PERSON> Board.tar.gz`
    ("Letter from Rivera to <PERSON>.pdf", "Letter from Rivera to <PERSON>.pdf"),  # was `from <PERSON> to`
    ("Access maria.gonzalez.Docx.Bak.Old.Enc", "Access <STAFF>.Docx.Bak.Old.Enc"),  # was `….Old.<PERSON>`
    ("Access maria.gonzalez.docx.bak.old.enc", "Access <STAFF>.docx.bak.old.enc"),  # was stored as given
])
def test_a_run_reads_a_stored_title_with_the_department_s_recognizers_alone_even_one_of_type_person(
        redactor: PiiRedactor, stored: str, redacted: str) -> None:
    """A run's `rules_only` reading of a stored title asks Presidio for the department's types alone, and a department
    recognizer of type PERSON put the NER among them: every run read the stored title's placeholders as context and
    took a word beside one for a name (`Minutes`), and a capitalised extension too (`Enc`). No reading of a run
    runs the NER now, while the department's pattern still reads each reading of the chain: the one ending at the
    handle it anchors on (`$`) is the fourth, which the chain's old depth of three never reached."""
    from guard.pii_rules import CustomRecognizer, RedactionRules

    rules = RedactionRules(recognizers=(
        CustomRecognizer(entity="PERSON", pattern=r"\bjan\.horak\b"),  # puts PERSON among the types asked for
        CustomRecognizer(entity="STAFF", pattern=r"\b[a-z]+\.gonzalez$"),
    ))
    assert redactor.redact_title(stored, rules, rules_only=True) == redacted


def test_a_run_without_department_recognizers_gives_back_the_stored_title() -> None:
    """A run applies the department's own recognizers again to the stored title; with none, the title as stored at
    upload (redacted, cut, stripped, or 'untitled') comes back unchanged."""
    from guard.pii_rules import RedactionRules
    from ingestion.service import MAX_TITLE_CHARS, _redacted_title

    raws = ["Travel claim maria.gonzalez@example.com.txt", "  Quarterly report 2024.pdf  ", "",
            "Minutes of the board " * 12 + "card 4111 1111 1111 1111.pdf"]
    stored = [_redacted_title(raw, RedactionRules()) for raw in raws]
    assert stored[2] == "untitled" and len(stored[3]) <= MAX_TITLE_CHARS and "<CREDIT_CARD>" in stored[3]
    assert [_redacted_title(title, RedactionRules(), rules_only=True) for title in stored] == stored
