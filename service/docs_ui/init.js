// Starts Swagger UI on the API's own document (a file, not an inline script: the page's CSP forbids those).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null, // never ask an outside validator about the document
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
