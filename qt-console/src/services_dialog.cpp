// SPDX-License-Identifier: LGPL-2.1-or-later
// See services_dialog.hpp.
#include "services_dialog.hpp"

#include <QComboBox>
#include <QDialogButtonBox>
#include <QFile>
#include <QHBoxLayout>
#include <QHeaderView>
#include <QJsonDocument>
#include <QLabel>
#include <QLineEdit>
#include <QNetworkReply>
#include <QPushButton>
#include <QTableWidget>
#include <QVBoxLayout>

namespace otpgate::console {

namespace {
enum Column { kind_column, url_column, user_column, password_column };
const char* kind_name(ServicePoller::Kind kind) {
  return kind == ServicePoller::Kind::gateway ? "gateway" : "transfer";
}
}  // namespace

QList<ServiceEntry> load_services(QSettings& settings) {
  QList<ServiceEntry> out;
  const int n = settings.beginReadArray("services");
  for (int i = 0; i < n; ++i) {
    settings.setArrayIndex(i);
    ServiceEntry e;
    e.kind = settings.value("kind").toString() == "transfer" ? ServicePoller::Kind::transfer
                                                             : ServicePoller::Kind::gateway;
    e.url = QUrl(settings.value("url").toString());
    e.user = settings.value("user").toString();
    e.password = settings.value("password").toString();
    out << e;
  }
  settings.endArray();
  if (n > 0) return out;
  for (const auto& [key, kind] : {std::pair{"gateways", ServicePoller::Kind::gateway},
                                  std::pair{"transfers", ServicePoller::Kind::transfer}}) {
    for (const auto& url : settings.value(key).toStringList())
      out << ServiceEntry{kind, QUrl(url), {}, {}};
  }
  return out;
}

void save_services(QSettings& settings, const QList<ServiceEntry>& services) {
  settings.remove("gateways");
  settings.remove("transfers");
  settings.remove("services");
  settings.beginWriteArray("services", int(services.size()));
  for (int i = 0; i < services.size(); ++i) {
    settings.setArrayIndex(i);
    settings.setValue("kind", kind_name(services[i].kind));
    settings.setValue("url", services[i].url.toString());
    settings.setValue("user", services[i].user);
    settings.setValue("password", services[i].password);
  }
  settings.endArray();
  settings.sync();
  // Passwords are in this file: the operator's eyes only.
  QFile::setPermissions(settings.fileName(), QFile::ReadOwner | QFile::WriteOwner);
}

QString url_problem(const QString& text) {
  const QUrl url(text.trimmed());
  if (!url.isValid() || (url.scheme() != "http" && url.scheme() != "https") || url.host().isEmpty())
    return text + " is not a service URL such as http://127.0.0.1:48080";
  return {};
}

ServicesDialog::ServicesDialog(const QList<ServiceEntry>& services, QWidget* parent)
    : QDialog(parent) {
  setWindowTitle("otp-console: services to watch");
  auto* layout = new QVBoxLayout(this);
  auto* intro = new QLabel(
      "Add the gateways (status API, e.g. http://127.0.0.1:8080) and transfer services (job "
      "API, e.g. http://127.0.0.1:7480) to watch. User and password only where the service "
      "asks for a login (HTTP Basic).",
      this);
  intro->setWordWrap(true);
  layout->addWidget(intro);
  table_ = new QTableWidget(0, 4, this);
  table_->setHorizontalHeaderLabels({"Kind", "URL", "User", "Password"});
  table_->horizontalHeader()->setSectionResizeMode(url_column, QHeaderView::Stretch);
  table_->verticalHeader()->hide();
  table_->setSelectionBehavior(QAbstractItemView::SelectRows);
  table_->setSelectionMode(QAbstractItemView::SingleSelection);
  layout->addWidget(table_);
  auto* row_buttons = new QHBoxLayout();
  auto* add_gateway = new QPushButton("Add gateway", this);
  auto* add_transfer = new QPushButton("Add transfer service", this);
  auto* remove = new QPushButton("Remove", this);
  auto* test = new QPushButton("Test connection", this);
  test->setObjectName("test");
  for (auto* b : {add_gateway, add_transfer, remove, test}) row_buttons->addWidget(b);
  row_buttons->addStretch();
  layout->addLayout(row_buttons);
  result_ = new QLabel(this);
  result_->setWordWrap(true);
  layout->addWidget(result_);
  auto* buttons = new QDialogButtonBox(QDialogButtonBox::Ok | QDialogButtonBox::Cancel, this);
  layout->addWidget(buttons);
  connect(add_gateway, &QPushButton::clicked, this, [this] {
    add_row({ServicePoller::Kind::gateway, QUrl("http://127.0.0.1:8080"), {}, {}});
  });
  connect(add_transfer, &QPushButton::clicked, this, [this] {
    add_row({ServicePoller::Kind::transfer, QUrl("http://127.0.0.1:7480"), {}, {}});
  });
  connect(remove, &QPushButton::clicked, this, [this] {
    if (table_->currentRow() >= 0) table_->removeRow(table_->currentRow());
  });
  connect(test, &QPushButton::clicked, this, &ServicesDialog::test_connection);
  connect(buttons, &QDialogButtonBox::accepted, this, &ServicesDialog::accept);
  connect(buttons, &QDialogButtonBox::rejected, this, &QDialog::reject);
  for (const auto& s : services) add_row(s);
  resize(760, 360);
}

void ServicesDialog::add_row(const ServiceEntry& entry) {
  const int row = table_->rowCount();
  table_->insertRow(row);
  auto* kind = new QComboBox(table_);
  kind->addItems({"gateway", "transfer"});
  kind->setCurrentIndex(entry.kind == ServicePoller::Kind::gateway ? 0 : 1);
  table_->setCellWidget(row, kind_column, kind);
  table_->setItem(row, url_column, new QTableWidgetItem(entry.url.toString()));
  table_->setItem(row, user_column, new QTableWidgetItem(entry.user));
  auto* password = new QLineEdit(entry.password, table_);
  password->setEchoMode(QLineEdit::Password);
  table_->setCellWidget(row, password_column, password);
  table_->selectRow(row);
}

QList<ServiceEntry> ServicesDialog::services() const {
  QList<ServiceEntry> out;
  for (int row = 0; row < table_->rowCount(); ++row) {
    ServiceEntry e;
    e.kind = static_cast<QComboBox*>(table_->cellWidget(row, kind_column))->currentIndex() == 0
                 ? ServicePoller::Kind::gateway
                 : ServicePoller::Kind::transfer;
    e.url = QUrl(table_->item(row, url_column)->text().trimmed());
    e.user = table_->item(row, user_column)->text();
    e.password = static_cast<QLineEdit*>(table_->cellWidget(row, password_column))->text();
    out << e;
  }
  return out;
}

void ServicesDialog::test_connection() {
  const int row = table_->currentRow();
  if (row < 0) {
    result_->setText("Select a service first.");
    return;
  }
  const ServiceEntry e = services().at(row);
  if (const QString problem = url_problem(e.url.toString()); !problem.isEmpty()) {
    result_->setText(problem);
    return;
  }
  QNetworkRequest request = service_request(int(e.kind), e.url, e.user, e.password);
  request.setTransferTimeout(3000);
  result_->setText("Asking " + e.url.toString() + " ...");
  QNetworkReply* reply = network_.get(request);
  connect(reply, &QNetworkReply::finished, this, [this, reply, e] {
    reply->deleteLater();
    const int status = reply->attribute(QNetworkRequest::HttpStatusCodeAttribute).toInt();
    const QJsonDocument doc = QJsonDocument::fromJson(reply->readAll());
    if (reply->error() == QNetworkReply::NoError && doc.isObject()) {
      result_->setText(
          QString("%1 answers: %2 %3")
              .arg(e.url.toString(), kind_name(e.kind), doc.object().value("site").toString()));
    } else if (status == 401) {
      result_->setText(e.url.toString() + " asks for a login: check user and password");
    } else {
      result_->setText(e.url.toString() + " does not answer as a " + kind_name(e.kind) + ": " +
                       reply->errorString());
    }
  });
}

void ServicesDialog::accept() {
  for (const auto& e : services()) {
    if (const QString problem = url_problem(e.url.toString()); !problem.isEmpty()) {
      result_->setText(problem);
      return;
    }
  }
  QDialog::accept();
}

}  // namespace otpgate::console
