"""The DiffSynth Disk Cache web UI: `streamlit run webui.py` (or `make webui`), served on 127.0.0.1.

A form generated from the render config schema, a Render button that launches the CLI's render in the background,
live progress read from the run folder, Cancel / Resume, and the list of runs under the output root. The logic lives
in diffsynth/webui/ (Streamlit-free, unit-tested); this file only draws it.
"""

import time
from fractions import Fraction
from pathlib import Path

import streamlit as st

from diffsynth.config import read_text
from diffsynth.errors import UserError
from diffsynth.webui import form as F
from diffsynth.webui import labels as L
from diffsynth.webui import runs as R
from diffsynth.webui.paths import (
    UPLOAD_LIMIT_MB,
    VIDEO_SUFFIXES,
    confine,
    list_configs,
    list_models,
    list_videos,
    run_folder,
    run_name,
    save_upload,
)
from diffsynth.webui.settings import ensure_folders, load_settings

STATE_ICONS = {"running": ":material/play_circle:", "starting": ":material/hourglass_top:",
               "complete": ":material/check_circle:", "interrupted": ":material/pause_circle:",
               "failed": ":material/error:", "new": ":material/radio_button_unchecked:"}
SECTION_TITLES = {"data": "1. Your video", "pipeline": "2. The look", "models": "3. Models",
                  "smoother_configs": "Smoothing (FastBlend)", "executor": "Workers (many GPUs or machines)"}
SECTION_ORDER = ("data", "pipeline", "models", "smoother_configs", "executor")  # schema fields not named here come after
# How often an open run page (and the runs list) re-reads a run that is rendering. Each refresh is a few aggregate
# queries on the manifest; nothing refreshes while no render is active.
REFRESH_SECONDS = 2.0

st.set_page_config(page_title="DiffSynth Disk Cache", page_icon="🎨", layout="wide")
ss = st.session_state

try:
    settings = load_settings()
    ensure_folders(settings)
except (UserError, OSError) as error:
    st.error(f"Web UI settings: {error}")
    st.stop()


# --- shared helpers -------------------------------------------------------------------------------------------------

def open_run(name):
    st.query_params["run"] = name


def close_run():
    st.query_params.pop("run", None)


def notify(kind, message):
    ss.setdefault("notices", []).append((kind, message))


def show_notices():
    for kind, message in ss.pop("notices", []):
        getattr(st, kind)(message)


@st.cache_data(show_spinner=False, max_entries=64)
def probe_video(path, mtime):
    """(frame count, fps, width, height) of a video, or an error message."""
    import av

    from diffsynth.video import probe_video_file
    try:
        source = probe_video_file(Path(path))
        with av.open(path) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
        return {"frames": len(source), "fps": float(source.fps), "width": width, "height": height}
    except UserError as error:
        return {"error": str(error)}


@st.cache_data(show_spinner=False, max_entries=16)
def video_still(path, mtime, index):
    """One frame of a video (uint8 RGB), for the preview: a picture instead of loading the whole file into the
    page on every rerun."""
    from diffsynth.video import decode, probe_video_file
    try:
        source = probe_video_file(Path(path))
        return next((image for _, image in decode(source, [min(index, len(source) - 1)])), None)
    except UserError:
        return None


def aspect_text(width, height):
    if not width or not height:
        return "—"
    ratio = Fraction(int(width), int(height))
    return f"{ratio.numerator}:{ratio.denominator} ({width / height:.2f})"


# --- form state ---------------------------------------------------------------------------------------------------

def set_form(data):
    """Replace the whole form with a config dict (called from callbacks, before widgets are drawn)."""
    for key in [k for k in ss.keys() if str(k).startswith(("f:", "n:", "pick:", "range:"))]:
        del ss[key]
    for key, value in F.state_from_data(F.output_as_run_name(data, settings)).items():
        ss[key] = value
    ss["show_errors"] = False


def ensure_form():
    if "form_ready" not in ss:
        set_form(F.default_data())
        ss["f:data.output_folder"] = time.strftime("run-%Y%m%d-%H%M%S")
        ss["form_ready"] = True


def load_config_file():
    choice = ss.get("config_choice")
    if not choice:
        return
    try:
        path = confine(choice, settings, "configs")
        data, problems = F.load_config_text(read_text(path), path.parent)
    except (UserError, OSError) as error:
        notify("error", f"Cannot load {choice}: {error}")
        return
    show_loaded(data, problems, path)


def show_loaded(data, problems, name):
    """Put a loaded config into the form and say what was loaded and what in it did not validate."""
    set_form(data)
    notify("success", f"Loaded {name}")
    for problem in problems:
        notify("warning", f"The loaded config: {problem}")


def load_uploaded_config():
    upload = ss.get("config_upload")
    if upload is None:
        return
    try:
        data, problems = F.load_config_text(upload.getvalue().decode("utf-8", "replace"), settings.configs[0])
    except UserError as error:
        notify("error", f"Cannot load {upload.name}: {error}")
        return
    show_loaded(data, problems, upload.name)


def load_demo():
    from diffsynth.demo import DEMO_CONFIG, ensure_demo_assets
    ensure_demo_assets()
    data, _ = F.load_config_text(DEMO_CONFIG.read_text(), DEMO_CONFIG.parent)
    data["data"]["output_folder"] = time.strftime("demo-%Y%m%d-%H%M%S")
    set_form(data)
    notify("success", "Loaded the demo config (tiny models, a synthetic 48-frame clip)")


def save_config_file():
    name = (ss.get("save_name") or "").strip()
    data, problems = F.confine_paths(F.data_from_state(ss), settings)
    data = F.with_output_folder(data, settings)
    try:
        if problems:
            key, message = next(iter(problems.items()))
            raise UserError(f"{key}: {message}")
        if not name.endswith((".yaml", ".yml")):
            raise UserError("the file name must end with .yaml or .yml")
        path = confine(name, settings, "configs", base=settings.configs[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(F.config_yaml(data))
    except (UserError, OSError) as error:
        notify("error", f"Not saved: {error}")
        return
    notify("success", f"Saved {path}")


def start_render():
    """The Render button: validate (field errors shown under the fields), save the config in the run folder,
    launch the render in the background and open its page."""
    ss["show_errors"] = True
    config, errors = F.validate(F.data_from_state(ss), settings)
    if errors:
        notify("error", "Not started: fix the fields marked below.")
        return
    run_dir = Path(config.data.output_folder)
    try:
        if R.render_pid(run_dir):
            raise UserError(f"a render is already running in {run_dir.name}; open it from the runs list")
        with st.spinner("Checking the video and the model files…"):
            R.check_inputs(config)  # before the run folder exists: a mistake leaves no failed run behind
        config_path = R.save_run_config(config, run_dir)
        R.launch(run_dir, config_path)
    except (UserError, OSError) as error:
        notify("error", f"Not started: {error}")
        return
    open_run(run_name(settings, run_dir))


def save_uploaded_video(video_key):
    """The upload control: save the file into the videos folder and put it in the form."""
    upload = ss.get("video_upload")
    if upload is None:
        return
    try:
        path = save_upload(upload.name, upload.getvalue(), settings)
    except (UserError, OSError) as error:
        notify("error", f"Not uploaded: {error}")
        return
    info = probe_video(str(path), path.stat().st_mtime)
    if "error" in info:
        path.unlink()
        notify("error", f"Not uploaded: {info['error']}")
        return
    ss[video_key] = str(path)
    ss[F.widget_key(("data", "input_frames", "start_frame_id"))] = 0
    ss[F.widget_key(("data", "input_frames", "end_frame_id"))] = None
    notify("success", f"Uploaded {upload.name} into {path.parent} ({info['frames']} frames)")


def add_item(path, model):
    F.add_list_item(ss, path, model)


def remove_item(path, model, index):
    F.remove_list_item(ss, path, model, index)


def pick_into(target_key, pick_key):
    if ss.get(pick_key):
        ss[target_key] = ss[pick_key]


def sync_range(prefix):
    start, end = ss["range:" + F.dotted(prefix + ("range",))]
    ss[F.widget_key(prefix + ("start_frame_id",))] = int(start)
    ss[F.widget_key(prefix + ("end_frame_id",))] = int(end)


# --- the form, drawn from the schema --------------------------------------------------------------------------------

def show_errors(errors, path, leaf=True):
    if not ss.get("show_errors"):
        return
    for message in F.errors_for(errors, path, leaf):
        st.error(message, icon="⚠️")


def draw_leaf(spec, path, errors):
    key = F.widget_key(path)
    label = L.field_label(path, spec.label)
    help_text = L.field_help(path, spec.description)
    if spec.name == "output_folder":
        st.text_input(label, key=key, help=L.field_help(
            path, f"The run's folder under {settings.output}: its cache, frames and video.mp4."))
    elif spec.name == "video_file":
        st.file_uploader(f"Upload a video (up to {UPLOAD_LIMIT_MB // 1024} GB)", key="video_upload",
                         type=sorted(s.lstrip(".") for s in VIDEO_SUFFIXES), max_upload_size=UPLOAD_LIMIT_MB,
                         on_change=save_uploaded_video, args=(key,),
                         help=f"Saved into {settings.videos[0]}. For a bigger file, copy it into that folder and "
                              "pick it below.")
        videos = list_videos(settings)
        pick_key = "pick:" + F.dotted(path)
        st.selectbox(f"…or pick one from {settings.videos[0]}", [""] + videos, key=pick_key,
                     on_change=pick_into, args=(key, pick_key), format_func=lambda v: v or "(choose…)")
        st.text_input(label, key=key, help=help_text)
    elif spec.kind == "str_list" and spec.path_kind:
        current = [v for v in ss.get(key, []) if v]
        options = sorted(set(list_models(settings)) | set(current))
        st.multiselect(label, options, key=key, help=help_text)
    elif spec.name == "model_path":
        current = ss.get(key) or ""
        options = [""] + sorted(set(list_models(settings)) | ({current} if current else set()))
        st.selectbox(label, options, key=key, help=help_text, format_func=lambda v: v or "(choose…)")
    elif F.dotted(path) == "executor.address":  # only the server's own clusters: never typed (Ray sends pickles)
        options = [""] + list(settings.ray_addresses)
        if ss.get(key) not in options:
            ss[key] = ""
        st.selectbox(label, options, key=key, format_func=lambda v: v or "(this machine only)",
                     help=help_text + " — the clusters listed in the server's settings (ray_addresses in "
                                      "webui-settings.yaml, or DIFFSYNTH_WEBUI_RAY_ADDRESSES)")
    elif spec.kind == "choice":
        st.selectbox(label, list(spec.choices), key=key, help=help_text)
    elif spec.kind == "bool":
        st.checkbox(label, key=key, help=help_text)
    elif spec.kind in ("int", "float"):
        step = 1 if spec.kind == "int" else 0.05
        extra = {} if spec.kind == "int" else {"format": "%.2f"}
        value = ss.get(key)
        wanted = int if spec.kind == "int" else float
        if value is not None and type(value) is not wanted:  # noqa: E721 - only a loaded config can do this
            ss[key] = wanted(value)  # (setting it on every run would fight the browser's newer value)
        if spec.optional:
            help_text += " (leave empty for the default)"
        st.number_input(label, key=key, step=step, help=help_text, **extra)
    elif spec.kind == "text":
        st.text_area(label, key=key, help=help_text, height=80)
    elif spec.kind == "number_list":
        st.text_input(label + " (comma-separated)", key=key, help=help_text)
    elif spec.kind == "word_or_numbers":
        st.text_input(label, key=key, help=help_text + f" ({' or '.join(spec.choices)}, or numbers separated by commas)")
    elif spec.kind == "dict":
        st.text_area(label + " (YAML mapping)", key=key, help=help_text, height=80)
    else:
        st.text_input(label, key=key, help=help_text)
    show_errors(errors, path, leaf=True)


def draw_frames_extras(path):
    """Under a FramesConfig: a still of the first frame to render, the frame-range slider, the output's aspect."""
    video = ss.get(F.widget_key(path + ("video_file",))) or ""
    height = ss.get(F.widget_key(path + ("height",)))
    width = ss.get(F.widget_key(path + ("width",)))
    info = None
    if video.strip():
        try:
            video_path = confine(video, settings, "videos")
        except UserError:
            video_path = None  # the field error says why
        if video_path and not video_path.is_file():
            st.warning(f"There is no video {video_path}: upload it above, or copy it into {settings.videos[0]}.")
        elif video_path:
            info = probe_video(str(video_path), video_path.stat().st_mtime)
            if "error" in info:
                st.warning(info["error"])
                info = None
            else:
                start = int(ss.get(F.widget_key(path + ("start_frame_id",))) or 0)
                still = video_still(str(video_path), video_path.stat().st_mtime, start)
                if still is not None:
                    st.image(still, caption=f"frame {start} of the source", width=min(480, still.shape[1]))
                st.caption(f"{info['frames']} frames · {info['fps']:.3g} fps · {info['width']}×{info['height']} "
                           f"(aspect {aspect_text(info['width'], info['height'])})")
                if st.toggle("Play the source video here", key="play:" + F.dotted(path)):
                    st.video(str(video_path), width=min(640, max(240, info["width"])))
    if info and info["frames"] > 1:
        start_key = F.widget_key(path + ("start_frame_id",))
        end_key = F.widget_key(path + ("end_frame_id",))
        start = min(max(int(ss.get(start_key) or 0), 0), info["frames"] - 1)
        end = ss.get(end_key)
        end = info["frames"] if end is None else min(max(int(end), start + 1), info["frames"])
        range_key = "range:" + F.dotted(path + ("range",))
        if tuple(ss.get(range_key) or ()) != (start, end):
            ss[range_key] = (start, end)  # follow the number inputs (only when they differ: see draw_leaf)
        st.slider("Frames to render", 0, info["frames"], key=range_key, on_change=sync_range, args=(path,),
                  help="Sets the first frame and the frame to stop before (config keys "
                       f"`{F.dotted(path)}.start_frame_id` and `end_frame_id`).")
        seconds = (end - start) / info["fps"] if info["fps"] else 0
        st.caption(f"{end - start} frames ({seconds:.1f} s) will be rendered")
    if width and height:
        text = f"Output {int(width)}×{int(height)}, aspect {aspect_text(width, height)}"
        if info:
            text += f"; the source is {aspect_text(info['width'], info['height'])}"
        st.caption(text)


def wanted(spec, path, which):
    """Whether a field is drawn in this pass: "basic" (open), "advanced" (folded) or "all"."""
    if which == "all" or spec.kind == "section":
        return True  # a section's own fields decide, one by one
    return L.is_basic(path) == (which == "basic")


def draw_model(model, prefix, errors, which="all"):
    for spec in F.fields_of(model):
        path = prefix + (spec.name,)
        if not wanted(spec, path, which):
            continue
        if spec.kind == "section":
            if which != "advanced":  # a section's own problems (give exactly one of …) once, with its open fields
                show_errors(errors, path, leaf=False)
            section = F.section_model(spec, lambda name: ss.get(F.widget_key(prefix + (name,))))
            for key, value in F.state_from_data({}, section, path).items():
                if key not in ss:  # switched to another processor type: its fields start at the schema defaults
                    ss[key] = value
            draw_model(section, path, errors, which)
        elif spec.kind == "list_section":
            draw_list(spec, path, errors)
        else:
            draw_leaf(spec, path, errors)
    if model.__name__ == "FramesConfig" and which != "advanced":
        draw_frames_extras(prefix)


def draw_list(spec, path, errors):
    count = int(ss.get(F.count_key(path), 0) or 0)
    label = L.field_label(path, spec.label)
    item_name = "guide" if spec.name == "controlnet_units" else "entry"
    st.markdown(f"**{label}** ({count})" + (f" — {spec.description}" if spec.description else ""),
                help=L.field_help(path, ""))
    show_errors(errors, path, leaf=False)
    for index in range(count):
        with st.container(border=True):
            head, button = st.columns([5, 1])
            head.markdown(f"{item_name} {index + 1}")
            button.button("Remove", key=f"remove:{F.dotted(path)}:{index}", on_click=remove_item,
                          args=(path, spec.model, index))
            show_errors(errors, path + (index,), leaf=False)
            draw_model(spec.model, path + (index,), errors, "all")
    st.button(f"Add a {item_name}", key=f"add:{F.dotted(path)}", on_click=add_item, args=(path, spec.model))


FIELD_KINDS = {L.template_key(path): spec.kind for path, spec in F.walk()}


def has_advanced_errors(errors, name):
    """Whether a folded field of this section has a problem (so its fold opens)."""
    for key in errors:
        parts = key.split(".")
        while parts and parts[-1].isdigit():
            parts.pop()  # models.model_list.1 is the model_list field's problem
        if parts and parts[0] == name and FIELD_KINDS.get(L.template_key(parts)) != "section" \
                and not L.is_basic(parts):
            return True
    return False


def draw_section(spec, errors):
    """One part of the form: its everyday fields open, the rest folded under "More settings" (unfolded when one of
    them has a problem to fix)."""
    name = spec.name
    title = SECTION_TITLES.get(name, L.field_label((name,), spec.label))
    if spec.kind != "section":  # a list of sub-forms or a lone field at the top: folded whole
        with st.expander(title, expanded=bool(ss.get("show_errors") and has_advanced_errors(errors, name))):
            draw_list(spec, (name,), errors) if spec.kind == "list_section" else draw_leaf(spec, (name,), errors)
        return
    with st.container(border=True):
        st.subheader(title)
        show_errors(errors, (name,), leaf=False)
        draw_model(spec.model, (name,), errors, "basic")
        unfold = bool(ss.get("show_errors") and has_advanced_errors(errors, name))
        with st.expander("More settings", expanded=unfold, key=f"more:{name}"):
            draw_model(spec.model, (name,), errors, "advanced")


def problem_lines(errors):
    """Each problem in the form as 'label: message', so the list at the Render button says what to fix."""
    lines = []
    for key, messages in errors.items():
        parts = key.split(".") if key else []
        label = L.field_label(parts, key) if parts else "the config"
        lines += [f"**{label}** — {message}" for message in messages]
    return lines


def draw_render_bar(errors, key):
    """The Render button with what stops it, at the top of the form, so neither needs scrolling to."""
    cols = st.columns([1, 1, 4])
    cols[0].button("Render", key=key, type="primary", on_click=start_render, width="stretch")
    cols[1].button("Check", key=f"{key}:check", on_click=lambda: ss.update(show_errors=True), width="stretch")
    if ss.get("show_errors"):
        if errors:
            cols[2].error("Not ready to render:\n" + "\n".join(f"- {line}" for line in problem_lines(errors)))
        else:
            cols[2].success("Ready to render.")


def draw_plan(config):
    """The render's plan, as `diffsynth plan` prints it (stages, disk at the peak and at the end under data.keep,
    VRAM), on demand: it decodes a frame or two and runs the VAE once, too slow to redo at every keystroke. Shown
    while the form still holds the config it was made for."""
    if config is None:
        return
    from diffsynth.plan import make_plan, plan_lines

    key = config.model_dump_json()
    cols = st.columns([1, 5])
    if cols[0].button("Plan", key="plan", help="what this render needs before it starts: disk (peak and at the "
                      "end), VRAM, and what an existing run folder already has", width="stretch"):
        try:
            with st.spinner("Planning…"):
                ss["plan"] = (key, "\n".join(plan_lines(make_plan(config))))
        except (UserError, OSError) as error:
            ss["plan"] = (key, f"No plan: {error}")
    shown = ss.get("plan")
    if shown and shown[0] == key:
        cols[1].code(shown[1], language=None)


def draw_form():
    ensure_form()
    st.title(":material/palette: DiffSynth Disk Cache")
    st.caption("Toon-shade a video. Every intermediate is kept on disk, so a render survives a crash or a closed tab.")
    show_notices()

    with st.expander("Load or save a config", expanded=False):
        cols = st.columns([3, 1, 1])
        cols[0].selectbox("config file", [""] + list_configs(settings), key="config_choice",
                          format_func=lambda v: v or "(choose a YAML config…)")
        cols[1].button("Load", key="load_config", on_click=load_config_file, width="stretch")
        cols[2].button("Load the demo", key="load_demo", on_click=load_demo, width="stretch")
        st.file_uploader("or upload a YAML config", type=["yaml", "yml", "json"], key="config_upload",
                         on_change=load_uploaded_config)
        data = F.data_from_state(ss)
        cols = st.columns([3, 1, 1])
        cols[0].text_input("save as (under the configs folder)", key="save_name", value="my-render.yaml")
        cols[1].button("Save", key="save_config", on_click=save_config_file, width="stretch")
        cols[2].download_button("Download YAML", F.config_yaml(F.with_output_folder(data, settings)),
                                file_name="render.yaml", mime="text/yaml", width="stretch")

    config, errors = F.validate(F.data_from_state(ss), settings)
    draw_render_bar(errors, "render")
    specs = {spec.name: spec for spec in F.fields_of(F.RenderConfig)}
    order = [n for n in SECTION_ORDER if n in specs] + [n for n in specs if n not in SECTION_ORDER]
    for name in order:
        draw_section(specs[name], errors)
    # The plan sits at the foot of the form, beside the last Render button: drawn above the sections, its columns
    # shifted the form's elements, and an uploaded video no longer reached its field in the browser.
    draw_plan(config)
    st.button("Render", key="render_bottom", type="primary", on_click=start_render)


# --- one run's page -------------------------------------------------------------------------------------------------

def do_cancel(run_dir):
    if R.cancel(run_dir):
        notify("info", "Cancel requested: the render stops after its current unit and stays resumable.")
    else:
        notify("warning", "No render is running in this folder.")


def do_resume(run_dir):
    """Resume a run and open its page. Called for a button's click from inside a fragment: the caller then reruns
    the whole app (st.rerun(scope="app")), so the page shows the run at once and starts following it."""
    try:
        R.resume(run_dir, settings)
    except (UserError, OSError) as error:
        notify("error", f"Not resumed: {error}")
        return
    open_run(run_name(settings, run_dir))


def eta_text(metrics, state):
    if state not in R.ACTIVE_STATES and state != "interrupted":
        return "—"
    if metrics["eta_seconds"] is None:
        return "estimating…"
    text = R.format_seconds(metrics["eta_seconds"])
    return f"at least {text}" if metrics["eta_untimed"] else text


def stage_rows(stages, steps):
    return [{"stage": L.stage_title(s["name"], steps), "done": s["done"], "of": s["total"],
             "progress": s["done"] / s["total"] if s["total"] else 1.0,
             "on disk (MB)": round(s["bytes"] / 1e6, 2), "stage id": s["name"]} for s in stages]


def draw_frames(run_dir, frames, shots=None, num_frames=None):
    """The newest finished frame beside the source frame it was made from, and a scrubber over finished frames
    with the shot boundaries on its track."""
    if not frames:
        return
    newest = frames[-1]
    index = newest
    if len(frames) > 1:
        follow = st.toggle("Follow the newest frame", value=True, key=f"follow:{run_dir.name}")
        if not follow:
            index = st.slider("Finished frame", frames[0], newest, value=newest, key=f"scrub:{run_dir.name}")
            index = max((f for f in frames if f <= index), default=frames[0])  # the nearest finished one
    if num_frames:
        st.image(R.shot_strip(num_frames, frames, shots, index), width="stretch")
        st.caption(R.shot_caption(shots, num_frames, index) + " (red: a new shot starts)")
    result_col, source_col = st.columns(2)
    for column, file, caption in (
            (result_col, R.output_frame_file(run_dir, index), f"result, frame {index}"),
            (source_col, R.source_frame_file(run_dir, index), f"source, frame {index}")):
        image = R.read_frame(file) if file else None
        column.caption(caption if image is not None else f"{caption}: no longer on disk")
        if image is not None:
            column.image(image, width=min(640, image.shape[1]))  # small frames at their own size, not blown up


def draw_progress(run_dir, refreshing):
    report = R.read_progress(run_dir)
    state = report["state"]
    if (state in R.ACTIVE_STATES) != refreshing:
        # The run started (Resume) or stopped since this fragment was set up: redraw the whole page, which decides
        # again whether to keep refreshing.
        st.rerun(scope="app")
    metrics = report["metrics"]
    steps = L.denoising_steps([s["name"] for s in report["stages"]])
    st.markdown(f"### {STATE_ICONS.get(state, '')} {report['name']}: **{state}**")
    if report["message"] and state in ("failed", "interrupted"):
        (st.error if state == "failed" else st.info)(report["message"])
    total, done = report["total"], report["done"]
    current = metrics["current_stage"]
    now = L.stage_title(current, steps) if current else ("done" if state == "complete" else "—")
    st.progress(done / total if total else 0.0, text=f"{done} of {total} work units · {now}")
    rate = metrics["stage_rate"]
    st.markdown(f"**Now:** {now}" + (f" ({rate:.2f} units/s)" if rate else ""))
    cols = st.columns(3)
    cols[0].metric("Time left", eta_text(metrics, state),
                   help="From the measured speed of each stage; 'at least' while some stages are not timed yet")
    cols[1].metric("Speed", f"{metrics['fps']:.2f} frames/s" if metrics["fps"] else "—",
                   help="output frames per second of work, end to end (estimated from the finished units)")
    cols[2].metric("Time worked", R.format_seconds(metrics["elapsed_seconds"]))

    if state in R.ACTIVE_STATES:
        if st.button("Cancel", key="cancel", help="stop after the current unit; Resume continues where it stopped"):
            do_cancel(run_dir)
            st.rerun(scope="app")
    elif state in ("interrupted", "failed") and st.button("Resume", key="resume", type="primary",
                                                          help="continue where it stopped"):
        do_resume(run_dir)
        st.rerun(scope="app")

    frames_total = next((s["total"] for s in report["stages"] if s["name"] == "crop"), None)
    draw_frames(run_dir, report["frames"], report.get("shots"), frames_total)
    if report["stages"]:
        rows = stage_rows(report["stages"], steps)
        st.dataframe(rows, hide_index=True, width="stretch", height=38 + 35 * len(rows), column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)})
    else:
        st.info("Waiting for the render to plan its stages…" if state in R.ACTIVE_STATES else "No stages yet.")
    with st.expander("Log"):
        st.code(report["log"] or "(no render.log yet)", language=None)
        if report["process_log"]:
            st.caption("process output")
            st.code(report["process_log"], language=None)


def draw_run(name):
    try:
        run_dir = run_folder(settings, name)
    except UserError as error:
        st.error(f"Run {name!r}: {error}")
        st.button("← New render", key="close_run", on_click=close_run)
        return
    st.button("← New render", key="close_run", on_click=close_run)
    show_notices()
    if not run_dir.is_dir():
        st.error(f"There is no run folder {name!r} under {settings.output}.")
        return
    report = R.read_progress(run_dir)
    refreshing = report["state"] in R.ACTIVE_STATES

    @st.fragment(run_every=REFRESH_SECONDS if refreshing else None)
    def live():
        draw_progress(run_dir, refreshing)

    live()
    if report["video"]:
        draw_result(report)  # outside the fragment: scrubbing frames does not send the video again


def draw_result(report):
    st.subheader("Result")
    video_path = Path(report["video"])
    player, side = st.columns([2, 1])
    player.video(str(video_path))
    # A deferred download: the file is read when the button is pressed, not into memory on every rerun.
    side.download_button("Download video.mp4", lambda: video_path.open("rb"), file_name=f"{report['name']}.mp4",
                         mime="video/mp4", key="download_video", type="primary")
    side.caption(f"{video_path} · {video_path.stat().st_size / 1e6:.2f} MB")


# --- the runs list ----------------------------------------------------------------------------------------------------

def draw_runs_list(current):
    with st.sidebar:
        st.header("Runs")
        st.caption(f"under {settings.output}")
        refreshing = any(report["state"] in R.ACTIVE_STATES for report in R.list_runs(settings))

        @st.fragment(run_every=REFRESH_SECONDS if refreshing else None)
        def runs_list():
            reports = R.list_runs(settings)
            if any(report["state"] in R.ACTIVE_STATES for report in reports) != refreshing:
                st.rerun(scope="app")  # a render started or stopped: set the refreshing up again
            if not reports:
                st.caption("No runs yet.")
            for report in reports:
                name = report["name"]
                box = st.container(border=True)
                marker = " (open)" if name == current else ""
                # The open run's numbers are on the right; two copies, refreshed a moment apart, would disagree.
                show_count = report.get("total") and name != current
                progress = f" · {report['done']} of {report['total']}" if show_count else ""
                box.markdown(f"{STATE_ICONS.get(report['state'], '')} **{name}**{marker}  \n"
                             f"{report['state']}{progress}")
                cols = box.columns(2)
                if cols[0].button("Open", key=f"open:{name}", width="stretch"):
                    open_run(name)
                    st.rerun(scope="app")  # a click reruns only this fragment: redraw the page for the run
                resumable = report["state"] in ("interrupted", "failed")
                if resumable and cols[1].button("Resume", key=f"resume:{name}", width="stretch"):
                    do_resume(settings.output / name)
                    st.rerun(scope="app")

        runs_list()
        with st.expander("Folders"):
            st.caption("models: " + ", ".join(str(p) for p in settings.models))
            st.caption("videos: " + ", ".join(str(p) for p in settings.videos))
            st.caption("configs: " + ", ".join(str(p) for p in settings.configs))
            st.caption(f"output: {settings.output}")


current_run = st.query_params.get("run")
draw_runs_list(current_run)
if current_run:
    draw_run(current_run)
else:
    draw_form()
