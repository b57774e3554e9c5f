"""End-to-end: the page in headless Chromium against a real uvicorn server with a tiny model."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from aicrl.serving.app import create_app

from .conftest import SAMPLES, serve

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium is not installed at {CHROMIUM} "
                       "(apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def web_server(web_model_dir, web_captioner, tmp_path_factory):
    # warmup: lazy imports and first-run costs are paid here, not by the first test's request
    app = create_app(model_dir=web_model_dir, db_path=tmp_path_factory.mktemp("web") / "gallery.db",
                     captioner=web_captioner, warmup=True)
    url, stop = serve(app)
    yield url
    stop()


@pytest.fixture(scope="module")
def web_browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a first caption on a busy 2-core machine can take seconds

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(web_browser, web_server):
    context = web_browser.new_context(viewport={"width": 1280, "height": 900},
                                      permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.console_errors = errors
    page.goto(web_server)
    yield page
    context.close()


def heatmap_drawn(page) -> bool:
    return page.evaluate("""() => {
        const c = document.getElementById('heatmap');
        if (c.hidden || !c.width || !c.height || c.getBoundingClientRect().width < 10) return false;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let alpha = 0;
        for (let i = 3; i < d.length; i += 4) alpha += d[i];
        return alpha > 0;
    }""")


def captionize(page, photo: Path, references: str | None = None):
    from playwright.sync_api import expect

    page.locator("#file").set_input_files(str(photo))
    expect(page.locator("#preview")).to_be_visible()
    if references is not None:
        page.fill("#references", references)
    page.click("#captionize")
    expect(page.locator("#best-caption")).to_be_visible(timeout=120_000)  # the first one loads the model
    return page.locator("#best-caption").inner_text().strip()


def test_caption_attention_bleu_and_refresh(page):
    from playwright.sync_api import expect

    expect(page.locator("#result")).to_have_text("Captions will appear here...")
    expect(page.locator("#style")).to_have_value("factual")
    expect(page.locator("#style option")).to_have_count(3)
    caption = captionize(page, SAMPLES / "chelsea.jpg", references="a cat lying on a rug\na tabby cat")
    words = caption.split()
    assert words, "empty caption"
    expect(page.locator("#result .tag").first).to_contain_text("cat")  # ImageNet tags under the caption
    expect(page.locator(".candidates li")).to_have_count(3)
    assert "score" in page.locator(".candidates li").first.inner_text()
    expect(page.locator("#alt-text")).to_have_value(caption)
    assert page.locator("#preview").get_attribute("alt") == f"Photo: {caption}"

    # attention: hover, keyboard focus and click a word
    assert not heatmap_drawn(page)
    page.locator("#best-caption .word").first.hover()
    assert heatmap_drawn(page)
    expect(page.locator("#attention-label")).to_contain_text(words[0])
    page.mouse.move(5, 5)
    assert not heatmap_drawn(page)
    page.locator("#best-caption .word").nth(1).focus()
    assert heatmap_drawn(page)
    page.keyboard.press("Enter")  # pins the word
    expect(page.locator("#best-caption .word").nth(1)).to_have_attribute("aria-pressed", "true")
    page.locator("#references").focus()
    assert heatmap_drawn(page)  # still shown: pinned

    # BLEU from the references given with the request, then re-scored with new ones
    expect(page.locator(".bleu-table td")).to_have_count(5)
    page.fill("#references", caption)
    page.click("#score")
    expect(page.locator('.bleu-table td[data-metric="BLEU-1"]')).to_have_text("1.000")

    # speak and copy
    page.click("#speak")
    expect(page.locator("#status")).to_have_text("Speaking the caption.")
    page.click("#copy")
    expect(page.locator("#status")).to_have_text("Alt text copied.")
    assert page.evaluate("navigator.clipboard.readText()") == caption

    page.click("#refresh")
    expect(page.locator("#result")).to_have_text("Captions will appear here...")
    expect(page.locator("#preview-figure")).to_be_hidden()
    expect(page.locator("#references")).to_have_value("")
    expect(page.locator("#bleu")).to_be_empty()
    expect(page.locator("#captionize")).to_be_disabled()
    assert not heatmap_drawn(page)
    assert page.console_errors == []  # no script error, no CSP violation


def test_another_caption_steps_through_different_captions(page):
    from playwright.sync_api import expect

    page.locator("#file").set_input_files(str(SAMPLES / "chelsea.jpg"))
    page.select_option("#style", "romantic")
    page.click("#another")
    expect(page.locator("#result-label")).to_have_text(re.compile(r"Caption 2 of \d+ \(romantic\)"))
    second = page.locator("#best-caption").inner_text().strip()
    page.click("#another")  # the next one, without asking the server again
    expect(page.locator("#result-label")).to_contain_text("Caption 3 of")
    third = page.locator("#best-caption").inner_text().strip()
    assert second and third and second != third
    assert not page.console_errors


def test_query_tab_finds_the_image_by_a_word_of_its_caption(page):
    from playwright.sync_api import expect

    caption = captionize(page, SAMPLES / "coffee.jpg")
    word = max(caption.split(), key=len)
    page.click("#tab-query")
    expect(page.locator("#panel-query")).to_be_visible()
    expect(page.locator("#panel-home")).to_be_hidden()
    page.fill("#q", word)
    page.press("#q", "Enter")
    expect(page.locator("#search-status")).to_contain_text("match")
    first = page.locator("#results .gallery-item").first
    expect(first.locator(".gallery-caption")).to_contain_text(word)
    expect(first.locator("img")).to_have_attribute("alt", first.locator(".gallery-caption").inner_text())
    page.wait_for_function("() => { const i = document.querySelector('#results img');"
                           " return i && i.complete && i.naturalWidth > 0; }")  # the thumbnail loads
    page.fill("#q", "zebra")
    page.press("#q", "Enter")
    expect(page.locator("#search-status")).to_contain_text("No captions match")
    expect(page.locator("#results .gallery-item")).to_have_count(0)
    assert page.console_errors == []


def test_info_tab_shows_the_model_card_and_tabs_work_by_keyboard(page):
    from playwright.sync_api import expect

    page.locator("#tab-home").focus()
    page.keyboard.press("End")
    expect(page.locator("#tab-info")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-info")).to_be_focused()
    info = page.locator("#info")
    expect(info).to_contain_text("Model card")
    summary = page.locator("#card-summary")  # short and readable first
    expect(summary).to_contain_text("efficientnet-lite2")
    expect(summary).to_contain_text("tiny random test model")  # from the model folder, not hard-coded
    expect(summary).to_contain_text("CIDEr 0.543")
    expect(summary).to_contain_text("PyTorch")
    expect(page.locator("#metrics")).to_be_hidden()  # the raw metrics are folded
    page.locator("#info-metrics summary").click()
    expect(page.locator("#metrics")).to_contain_text("0.2071")
    page.locator("#tab-info").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-home")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-home")).to_be_visible()
    page.evaluate("location.hash = '#query'")  # links to a tab work too
    expect(page.locator("#panel-query")).to_be_visible()
    assert page.console_errors == []


def test_input_image_button_drop_and_paste_choose_an_image(page):
    from playwright.sync_api import expect

    with page.expect_file_chooser() as chooser:
        page.click("#pick")  # the Input Image button opens the file picker
    chooser.value.set_files(str(SAMPLES / "chelsea.jpg"))
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#captionize")).to_be_enabled()
    make_event = """async (kind) => {
        const canvas = document.createElement('canvas');
        canvas.width = 64; canvas.height = 48;
        const ctx = canvas.getContext('2d');
        ctx.fillStyle = '#3a7'; ctx.fillRect(0, 0, 64, 48);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
        const data = new DataTransfer();
        data.items.add(new File([blob], kind + '.png', { type: 'image/png' }));
        if (kind === 'drop') {
            document.getElementById('dropzone').dispatchEvent(
                new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
        } else {
            document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
        }
    }"""
    for kind in ("drop", "paste"):
        page.click("#refresh")
        expect(page.locator("#preview-figure")).to_be_hidden()
        page.evaluate(make_event, kind)
        expect(page.locator("#preview-figure")).to_be_visible()
        page.click("#captionize")
        expect(page.locator("#best-caption")).to_be_visible()
    assert page.console_errors == []


def test_a_file_that_is_not_an_image_is_named_at_once(page):
    from playwright.sync_api import expect

    page.locator("#file").set_input_files(files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                                  "buffer": b"this is not a photo"}])
    expect(page.locator("#status")).to_contain_text('"notes.jpg" is not an image')
    expect(page.locator("#status")).to_have_class("status error")
    expect(page.locator("#preview-figure")).to_be_hidden()  # no broken-image icon
    expect(page.locator("#captionize")).to_be_disabled()
    page.locator("#file").set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"x"}])
    expect(page.locator("#status")).to_contain_text("is not an image")
    expect(page.locator("#result")).to_have_text("Captions will appear here...")


def test_gallery_detail_view_and_delete(page):
    from playwright.sync_api import expect

    captionize(page, SAMPLES / "coffee.jpg")
    page.select_option("#style", "humorous")
    page.click("#captionize")  # the same photo in another style: the same gallery item
    expect(page.locator("#result .label")).to_contain_text("humorous")
    page.click("#tab-query")
    page.fill("#q", "espresso")  # a tag: the tiny model's caption cannot say it
    page.press("#q", "Enter")
    expect(page.locator("#results .gallery-item")).to_have_count(1)
    item = page.locator("#results .gallery-item").first
    expect(item.locator(".gallery-tags")).to_contain_text("espresso")
    item.locator(".thumb").click()
    dialog = page.locator("#detail")
    expect(dialog).to_be_visible()
    expect(page.locator("#detail-close")).to_be_focused()
    page.wait_for_function("() => { const i = document.getElementById('detail-image');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    expect(dialog.locator(".detail-style h3")).to_have_count(2)  # factual and humorous
    expect(dialog.locator(".tag").first).to_contain_text("espresso")
    word = dialog.locator(".word").first
    expect(word).to_be_visible()
    word.focus()
    expect(dialog.locator("canvas.heatmap")).to_be_visible()  # the attention view
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(item.locator(".thumb")).to_be_focused()  # focus goes back where it was
    page.once("dialog", lambda d: d.accept())
    item.locator(".delete").click()
    expect(page.locator("#search-status")).to_have_text("Deleted from the gallery.")
    expect(page.locator("#results .gallery-item")).to_have_count(0)
    assert page.evaluate("document.activeElement.id") == "q"  # not <body>
    page.press("#q", "Enter")
    expect(page.locator("#search-status")).to_contain_text("No captions match")
    assert page.console_errors == []


def test_phone_width_and_keyboard_focus(web_browser, web_server):
    from playwright.sync_api import expect

    width = 390
    context = web_browser.new_context(viewport={"width": width, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(web_server)
    page.locator("#file").set_input_files(str(SAMPLES / "rocket.jpg"))
    expect(page.locator("#captionize")).to_be_focused()  # after choosing a file
    page.fill("#references", "a rocket on a launch pad")
    page.locator("#captionize").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#best-caption")).to_be_visible()
    expect(page.locator("#result-label")).to_be_focused()  # after Captionize: the caption, not <body>
    box = page.locator("#best-caption").bounding_box()
    assert 0 <= box["y"] and box["y"] + box["height"] <= 740, box  # scrolled into view
    expect(page.locator(".bleu-table")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    card = page.locator(".result-card").bounding_box()
    for selector in ("#captionize", "#preview", ".bleu-table", "#copy", "#tab-info", "#result .tags"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    table = page.locator(".bleu-table").bounding_box()
    assert table["x"] + table["width"] <= card["x"] + card["width"]
    page.click("#tab-info")
    for details in page.locator("#info details").all():
        details.locator("summary").click()
    expect(page.locator("#metrics")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # the Info tables too
    for selector in ("#metrics", "#info-architecture", "#card-summary"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    context.close()


def test_screenshot_with_a_caption(web_browser, web_model_dir, web_captioner, tmp_path):
    """docs/screenshot.png: the shipped model when the package has one, else the tiny test model."""
    from playwright.sync_api import expect

    shipped = ROOT / "aicrl" / "pretrained"
    if (shipped / "config.json").is_file():
        app = create_app(model_dir=shipped, db_path=tmp_path / "gallery.db")
    else:
        app = create_app(model_dir=web_model_dir, db_path=tmp_path / "gallery.db", captioner=web_captioner)
    url, stop = serve(app)
    try:
        context = web_browser.new_context(viewport={"width": 1200, "height": 820})
        page = context.new_page()
        page.goto(url)
        captionize(page, SAMPLES / "astronaut.jpg")
        page.locator("#best-caption .word").last.hover()
        expect(page.locator("#attention-label")).not_to_be_empty()
        tmp = tmp_path / "screenshot.png"
        page.screenshot(path=str(tmp), full_page=True)
        assert tmp.stat().st_size > 10_000
        if os.environ.get("AICRL_UPDATE_SCREENSHOT"):  # `make screenshot` refreshes the README's picture
            shutil.copyfile(tmp, ROOT / "docs" / "screenshot.png")
        context.close()
    finally:
        stop()
