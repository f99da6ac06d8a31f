"""The marketers' workbench: `streamlit run workbench/app.py` (reads $PIPELINE_HOME)."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Pipeline workbench", page_icon=":material/mail:", layout="wide")

pages = [
    st.Page("views/live.py", title="Live", icon=":material/monitoring:", default=True),
    st.Page("views/segments.py", title="Segments", icon=":material/groups:"),
    st.Page("views/customer.py", title="Customer 360", icon=":material/person_search:"),
    st.Page("views/email.py", title="Email preview", icon=":material/drafts:"),
    st.Page("views/quality.py", title="Data quality", icon=":material/rule:"),
    st.Page("views/alerts.py", title="Alerts", icon=":material/notifications_active:"),
]
st.navigation(pages).run()
