// The bundle's entry point: an anywidget module whose plot is drawn with Bokeh.
import { Panel } from "./panel.js";
import { bokehPlot } from "./plot.js";

export default {
  render({ model, el }) {
    const panel = new Panel(model, el, { plotFactory: bokehPlot });
    return () => panel.dispose();
  },
};
